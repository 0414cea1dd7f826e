"""CosyVoice2 token2wav（flow + HiFT）：官方鍵名嚴格載入、形狀、串流與一次算完的一致性。"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from export.cosyvoice2.flow import (
    FLOW_TINY,
    FlowModel,
    align_prompt,
    load_flow,
    save_random_flow,
)
from export.cosyvoice2.hift import HIFT_TINY
from export.cosyvoice2.token2wav import (
    SAMPLES_PER_FRAME,
    StreamConfig,
    Token2Wav,
    load_token2wav,
    save_random_token2wav,
)

# 公開的官方 CosyVoice2-0.5B flow.pt（sha256 ff4c2f86…）張量清單摘要：依鍵名排序，逐一串接
# 「鍵名、\0、維度數、各維大小（小端 u64）」後取 sha256。來源為 ayutaz/vokra 由真實檢查點
# 產生的 FLOW_SCHEMA（1121 個張量）。與之相符代表鍵名與形狀和官方檔案逐一一致。
OFFICIAL_FLOW_MANIFEST_SHA256 = "68abcdcdc961091b9c9e6456146ac9da06cda9f86e45a8faaac22a3b0b26217d"
OFFICIAL_FLOW_TENSORS = 1121

# 實測（tiny 隨機模型，CPU float32）：串流各塊 mel 與一次算完最大差 8.3e-7；
# 第一個接縫之前（扣掉 3840 點交叉淡化區）的波形最大差 5.3e-7。
MEL_TOL = 1e-5
WAV_TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """小模型在 2 核共用機器上用單執行緒最快，也避免與其他測試互搶；結束後還原。"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6561, (50,), generator=gen).tolist()
    prompt_tokens = torch.randint(0, 6561, (6,), generator=gen).tolist()
    prompt_mel = torch.randn(1, 12, 80, generator=gen)
    embedding = torch.randn(1, 192, generator=gen)
    return tokens, prompt_tokens, prompt_mel, embedding


@pytest.fixture(scope="module")
def t2w_dir(tmp_path_factory):
    # nsf_sigma=0：NSF 噪聲的抽取形狀隨呼叫長度而變，分段與一次算完的噪聲本來就不同；
    # 關掉它才能逐點比較第一段波形（其餘結構、卷積核與官方相同）。
    directory = tmp_path_factory.mktemp("t2w")
    return save_random_token2wav(
        directory,
        flow="tiny",
        hift={**HIFT_TINY, "nsf_sigma": 0.0},
        seed=3,
        stream={"stream_scale_factor": 1, "final_full_context": False},
    )


@pytest.fixture(scope="module")
def t2w(t2w_dir) -> Token2Wav:
    return load_token2wav(t2w_dir)


def _manifest_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        shape = tuple(state[key].shape)
        digest.update(key.encode() + b"\0" + struct.pack("<Q", len(shape)))
        for dim in shape:
            digest.update(struct.pack("<Q", dim))
    return digest.hexdigest()


def test_official_flow_layout_matches_checkpoint_inventory():
    with torch.device("meta"):
        model = FlowModel("official")
    state = model.state_dict()
    assert len(state) == OFFICIAL_FLOW_TENSORS
    assert _manifest_sha256(state) == OFFICIAL_FLOW_MANIFEST_SHA256
    assert tuple(state["decoder.estimator.down_blocks.0.0.block1.block.0.weight"].shape) == (
        256,
        320,
        3,
    )
    assert tuple(state["encoder.pre_lookahead_layer.conv1.weight"].shape) == (512, 512, 4)


def test_tiny_flow_strict_roundtrip(tmp_path, inputs):
    path = save_random_flow(tmp_path / "flow.pt", FLOW_TINY, seed=5)
    saved = torch.load(path, weights_only=True)
    model = load_flow(path, FLOW_TINY)
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # 與官方同一套鍵名結構，只是層數較少。
    assert "encoder.up_encoders.0.self_attn.pos_bias_u" in saved
    assert "decoder.estimator.mid_blocks.0.1.0.attn1.to_out.0.weight" in saved
    # 同一檔案讀兩次，推論結果逐位元相同（固定噪聲）。
    tokens, prompt_tokens, prompt_mel, embedding = inputs
    again = load_flow(path, FLOW_TINY)
    a = model.inference(tokens[:10], prompt_tokens, prompt_mel, embedding)
    b = again.inference(tokens[:10], prompt_tokens, prompt_mel, embedding)
    assert torch.equal(a, b)


def test_load_flow_reports_renamed_missing_and_shape_errors(tmp_path):
    path = save_random_flow(tmp_path / "flow.pt", "tiny", seed=0)
    state = torch.load(path, weights_only=True)
    renamed = dict(state)
    renamed["encoder_projection.weight"] = renamed.pop("encoder_proj.weight")
    del renamed["spk_embed_affine_layer.bias"]
    bad = tmp_path / "bad.pt"
    torch.save(renamed, bad)
    with pytest.raises(ValueError) as err:
        load_flow(bad, "tiny")
    message = str(err.value)
    assert "bad.pt" in message
    assert "encoder_proj.weight" in message and "spk_embed_affine_layer.bias" in message
    assert "encoder_projection.weight" in message
    # 用 tiny 檔案配官方設定：形狀不符也要明確列出。
    with pytest.raises(ValueError, match="形狀不符"):
        load_flow(path, {**FLOW_TINY, "input_size": 64})


def test_one_shot_shapes(t2w, inputs):
    tokens, prompt_tokens, prompt_mel, embedding = inputs
    mel = t2w.mel(tokens, prompt_tokens, prompt_mel, embedding)
    assert mel.shape == (1, 80, 100) and mel.dtype == torch.float32
    held = t2w.mel(tokens, prompt_tokens, prompt_mel, embedding, finalize=False)
    assert held.shape == (1, 80, 2 * (50 - 3))
    wav = t2w(tokens, prompt_tokens, prompt_mel, embedding)
    assert wav.dtype == np.float32 and wav.shape == (48000,)
    assert wav.size / t2w.sample_rate == pytest.approx(2.0)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 1e-3
    # 沒有提示時同樣成立。
    assert t2w(tokens[:7]).shape == (7 * 2 * SAMPLES_PER_FRAME,)


def test_stream_matches_one_shot(t2w, inputs):
    tokens, prompt_tokens, prompt_mel, embedding = inputs
    session = t2w.start_stream(prompt_tokens, prompt_mel, embedding)
    pieces = [session.push(tokens[i : i + 7]) for i in range(0, 50, 7)]
    pieces.append(session.finish())
    # 提示 6 個 token、分塊 10：第一塊 hop 補到 14，其後每塊 10，剩 6 個留給 finish。
    emitted = [p.size for p in pieces if p.size]
    assert emitted == [9600, 9600, 9600, 9600, 9600]
    # flow：分塊因果遮罩使每塊 mel 與一次算完（同樣用分塊遮罩）逐格相同。
    one_shot_mel = t2w.mel(tokens, prompt_tokens, prompt_mel, embedding, streaming=True)
    stream_mel = torch.cat(session.mels, dim=2)
    assert stream_mel.shape == one_shot_mel.shape == (1, 80, 100)
    assert (stream_mel - one_shot_mel).abs().max().item() < MEL_TOL
    # 波形：總長相同；第一個接縫前、交叉淡化區（3840 點）之前逐點相同。
    wav = t2w(tokens, prompt_tokens, prompt_mel, embedding, streaming=True)
    streamed = np.concatenate(pieces)
    assert streamed.shape == wav.shape == (48000,)
    first_join = emitted[0]
    exact = first_join - 8 * SAMPLES_PER_FRAME
    assert np.abs(streamed[:exact] - wav[:exact]).max() < WAV_TOL
    # 之後每次呼叫 HiFT 的諧波相位從頭累加（與官方相同），逐點不再相同，但仍是同量級的訊號。
    assert np.isfinite(streamed).all()
    rms = np.sqrt(np.mean(streamed[first_join:] ** 2)) / np.sqrt(np.mean(wav[first_join:] ** 2))
    assert 0.5 < rms < 2.0


def test_stream_final_full_context_and_no_hop(t2w_dir, t2w, inputs):
    tokens, prompt_tokens, prompt_mel, embedding = inputs
    flow, hift = t2w.flow, t2w.hift
    ref = Token2Wav(flow, hift, StreamConfig(final_full_context=True))
    session = ref.start_stream(prompt_tokens, prompt_mel, embedding)
    session.push(tokens)
    session.finish()
    assert [m.shape[2] for m in session.mels] == [28, 40, 32]
    masked = ref.mel(tokens, prompt_tokens, prompt_mel, embedding, streaming=True)
    full = ref.mel(tokens, prompt_tokens, prompt_mel, embedding, streaming=False)
    head = torch.cat(session.mels[:-1], dim=2)
    assert (head - masked[:, :, :68]).abs().max().item() < MEL_TOL
    # 官方收尾不用分塊遮罩：最後一段等於不用遮罩的一次算完結果。
    assert (session.mels[-1] - full[:, :, 68:]).abs().max().item() < MEL_TOL
    # token 不足一個 hop 時只有 finish 一段，波形與一次算完相同。
    short = ref.start_stream(prompt_tokens, prompt_mel, embedding)
    assert short.push(tokens[:10]).size == 0
    out = short.finish()
    expect = ref(tokens[:10], prompt_tokens, prompt_mel, embedding)
    assert out.shape == expect.shape == (10 * 2 * SAMPLES_PER_FRAME,)
    assert np.abs(out - expect).max() < WAV_TOL


def test_bad_inputs_and_config(t2w_dir, t2w, inputs):
    tokens, prompt_tokens, prompt_mel, embedding = inputs
    with pytest.raises(ValueError, match="prompt_mel"):
        t2w(tokens, prompt_tokens, prompt_mel[:, :11], embedding)
    with pytest.raises(ValueError, match="tokens"):
        t2w([0, 6561])
    with pytest.raises(ValueError, match="embedding"):
        t2w(tokens, embedding=torch.zeros(1, 80))
    aligned_tokens, aligned_mel = align_prompt(prompt_tokens + [1], prompt_mel[:, :11])
    assert aligned_tokens.shape == (1, 5) and aligned_mel.shape == (1, 10, 80)
    with pytest.raises(ValueError, match="static_chunk_size"):
        Token2Wav(t2w.flow, t2w.hift, {"token_hop_len": 7})
    config_path = t2w_dir / "token2wav.json"
    original = config_path.read_text(encoding="utf-8")
    try:
        config_path.write_text(json.dumps({"flow": "tiny", "vocoder": "x"}), encoding="utf-8")
        with pytest.raises(ValueError, match="vocoder"):
            load_token2wav(t2w_dir)
        config_path.write_text(json.dumps({"flow": {"input_sz": 3}}), encoding="utf-8")
        with pytest.raises(ValueError, match="input_sz"):
            load_token2wav(t2w_dir)
    finally:
        config_path.write_text(original, encoding="utf-8")
