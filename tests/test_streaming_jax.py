"""JAX 串流推論：逐幀（KV 快取、分塊 Whisper 編碼）與整段前向的每幀 logits 相同；自由執行可跑完。"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.models import model_config
from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config
from speakllm_jax.models.streaming import (
    encode_user_stream,
    encoder_window_frames,
    run_streaming,
)


def _model() -> SpeakLLM:
    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.qwen.vocab_size = 256
    mc.speech.codebook_size = 64
    return SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))


def test_streaming_equals_full_forward_per_frame() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    b, n, chunk = 2, 8, 4
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    text_in = jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32)
    tones_in = jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32)
    codes_in = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    valid = jnp.asarray(rng.random((b, n)) > 0.3)
    target = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    full = model.duplex_forward(
        feats,
        jnp.ones((b, 4 * n), bool),
        text_in,
        tones_in,
        codes_in,
        valid,
        target,
        jnp.ones((b, n), bool),
        chunk_frames=chunk * model.connector.stack,
    )
    teacher = dict(
        text_in=text_in,
        tones_in=tones_in,
        codes_in=codes_in,
        codes_in_valid=valid,
        codes_target=target,
    )
    out = run_streaming(model, feats, n, chunk, teacher=teacher)
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    np.testing.assert_allclose(out.turn_logits, np.asarray(full["turn"]), atol=1e-4)
    np.testing.assert_allclose(out.code_logits, np.asarray(full["codes"]), atol=1e-4)

    # 不同區塊大小的整段前向確實不同：等式不是因為遮罩沒作用。
    other = model.duplex_forward(
        feats,
        jnp.ones((b, 4 * n), bool),
        text_in,
        tones_in,
        codes_in,
        valid,
        target,
        jnp.ones((b, n), bool),
        chunk_frames=None,
    )
    assert np.abs(np.asarray(other["text"]) - out.text_logits).max() > 1e-5


def test_free_running_produces_frames() -> None:
    model = _model()
    feats = jnp.asarray(np.random.default_rng(1).standard_normal((1, 80, 40)).astype(np.float32))
    out = run_streaming(model, feats, 10, 5)
    assert out.text.shape == (1, 10) and out.turn.shape == (1, 10) and out.codes.shape == (1, 10, 4)
    assert out.codes.min() >= 0 and out.codes.max() < 64


# ---------------------------------------------------------------- 長對話：有界的編碼器與 LLM 脈絡


def _bounded_model() -> SpeakLLM:
    """位置表只有 12 框、左方 2 個區塊、2 個注意力槽加 5 幀視窗：短輸入就跨過所有邊界。"""
    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.qwen.vocab_size = 256
    mc.speech.codebook_size = 64
    mc.whisper.max_source_positions = 12
    mc.streaming = dict(encoder_left_chunks=2, llm_sink_frames=2, llm_window_frames=5)
    return SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))


def _teacher(rng: np.random.Generator, b: int, n: int) -> dict:
    return dict(
        text_in=jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32),
        tones_in=jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32),
        codes_in=jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32),
        codes_in_valid=jnp.asarray(rng.random((b, n)) > 0.3),
        codes_target=jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32),
    )


def _full(model: SpeakLLM, feats, tch: dict, chunk_enc: int | None) -> dict:
    b, _, m = feats.shape
    n = tch["text_in"].shape[1]
    return model.duplex_forward(
        feats,
        jnp.ones((b, m), bool),
        tch["text_in"],
        tch["tones_in"],
        tch["codes_in"],
        tch["codes_in_valid"],
        tch["codes_target"],
        jnp.ones((b, n), bool),
        chunk_frames=chunk_enc,
    )


def test_bounded_stream_equals_full_forward_and_torch_twin(tmp_path) -> None:
    """編碼器（28 框：跨過左方視窗與位置取模）與 LLM（14 幀：跨過注意力槽加視窗）的串流
    = 同一遮罩的整段前向 = PyTorch 孿生（整段與串流）。"""
    import torch

    from export.to_torch import export_model
    from export.torch_model import load_exported

    model = _bounded_model()
    rng = np.random.default_rng(0)
    b, n, chunk = 2, 14, 2
    m = 4 * n - 1  # 奇數框：最後一個區塊的前瞻與卷積右邊界都補零
    feats = jnp.asarray(rng.standard_normal((b, 80, m)).astype(np.float32))
    tch = _teacher(rng, b, n)
    full = _full(model, feats, tch, chunk * 2)
    out = run_streaming(model, feats, n, chunk, teacher=tch)
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    np.testing.assert_allclose(out.turn_logits, np.asarray(full["turn"]), atol=1e-4)
    np.testing.assert_allclose(out.code_logits, np.asarray(full["codes"]), atol=1e-4)

    # 邊界確實有作用：不限左方脈絡時編碼結果不同（12 框、6 個 2 框的區塊）。
    x = feats[:, :, :23]
    bounded = model.encoder(x, chunk_frames=2, left_chunks=2)
    wide = model.encoder(x, chunk_frames=2, left_chunks=0)
    assert np.abs(np.asarray(bounded) - np.asarray(wide)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(bounded)[:, :6], np.asarray(wide)[:, :6], atol=1e-5)

    export_model(model, tmp_path / "exp", parity_seed=None)
    tm = load_exported(tmp_path / "exp")
    assert tm.cfg.encoder_left_chunks == 2 and tm.llm_window == (2, 5)
    got = tm.stream(np.asarray(feats), n, chunk, teacher={k: np.asarray(v) for k, v in tch.items()})
    for key in ("text_logits", "turn_logits", "code_logits"):
        np.testing.assert_allclose(got[key], getattr(out, key), atol=1e-4)
    tfull = tm.duplex_forward(
        np.asarray(feats),
        np.ones((b, m), bool),
        *(
            np.asarray(tch[k])
            for k in ("text_in", "tones_in", "codes_in", "codes_in_valid", "codes_target")
        ),
        np.ones((b, n), bool),
        chunk_frames=chunk * 2,
    )
    np.testing.assert_allclose(tfull["text"].numpy(), np.asarray(full["text"]), atol=1e-4)

    # 自由執行（深度 Transformer 用 KV 快取逐碼本產生）：兩邊選出相同的符號與語音碼。
    free_j = run_streaming(model, feats, n, chunk)
    free_t = tm.stream(np.asarray(feats), n, chunk)
    np.testing.assert_allclose(free_t["text_logits"], free_j.text_logits, atol=1e-4)
    np.testing.assert_array_equal(free_t["codes"], free_j.codes)
    with torch.no_grad():
        h = torch.randn(3, 64)
        ref = tm.depth_generate(h)
    assert ref.shape == (3, 4)


def test_long_session_through_streamer_stays_bounded(tmp_path) -> None:
    """加速的長對話（600 幀 = 24 秒，視窗的 120 倍）經 `Streamer`：快取大小固定、輸出有限。"""
    import torch

    from export.to_torch import export_model
    from export.torch_model import Streamer, load_exported

    export_model(_bounded_model(), tmp_path / "exp", parity_seed=None)
    tm = load_exported(tmp_path / "exp")
    st = Streamer(tm, chunk_frames=2)
    rng = np.random.default_rng(3)
    prev = {
        "text": torch.zeros((1, 1), dtype=torch.long),
        "tones": torch.zeros((1, 1, 4), dtype=torch.long),
        "codes": torch.zeros((1, 1, 4), dtype=torch.long),
        "codes_valid": torch.zeros((1, 1), dtype=torch.bool),
    }
    frames, sizes = 0, set()
    for _ in range(600):
        user = st.push_audio((0.1 * rng.standard_normal(640)).astype(np.float32))
        for f in range(user.shape[1]):
            out = st.step(user[:, f : f + 1], prev)
            assert torch.isfinite(out["text"]).all() and torch.isfinite(out["turn"]).all()
            prev = {**prev, "text": out["text"].argmax(-1), "codes": out["code_ids"].long()}
            frames += 1
        sizes.add(tuple(sorted(st.cache_sizes().items())))
    assert frames == 598  # 增量梅爾與卷積前瞻共延後一個區塊（2 幀）
    final = st.cache_sizes()
    assert final["llm"] == 2 + 5 - 1 and final["encoder"] == 2 * 4
    assert max(dict(s)["mel"] for s in sizes) < 2 * 2 * 4 * 2 + 1
    assert max(dict(s)["samples"] for s in sizes) < 400 + 640
    assert st.position == frames


@pytest.mark.slow
def test_bounded_cosyvoice2_talker_follows_the_same_window(tmp_path) -> None:
    """cosyvoice2：talker 的 KV 快取與思考者同一個注意力槽加視窗方案；JAX 串流 = 整段 =
    PyTorch 串流，PyTorch 的 talker 快取大小有界。"""
    import torch

    from export.to_torch import export_model
    from export.torch_model import Streamer, load_exported

    speech = 61
    mc = model_config("tiny")
    mc.speech_head = "cosyvoice2"
    mc.qwen.vocab_size = 256
    mc.talker.qwen.vocab_size = 256
    mc.talker.speech_token_size = speech
    mc.streaming = dict(encoder_left_chunks=2, llm_sink_frames=2, llm_window_frames=5)
    model = SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    b, n, chunk = 1, 12, 2
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    tch = dict(
        text_in=jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32),
        tones_in=jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32),
        codes_in=jnp.asarray(rng.integers(0, speech, (b, n, 1)), jnp.int32),
        codes_in_valid=jnp.asarray(rng.random((b, n)) > 0.3),
        codes_target=jnp.asarray(rng.integers(0, speech, (b, n, 1)), jnp.int32),
        text_out=jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32),
    )
    full = model.duplex_forward(
        feats,
        jnp.ones((b, 4 * n), bool),
        *(tch[k] for k in ("text_in", "tones_in", "codes_in", "codes_in_valid", "codes_target")),
        jnp.ones((b, n), bool),
        chunk_frames=chunk * 2,
        text_out=tch["text_out"],
    )
    out = run_streaming(model, feats, n, chunk, teacher=tch)
    np.testing.assert_allclose(out.code_logits, np.asarray(full["codes"]), atol=1e-4)
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)

    export_model(model, tmp_path / "exp", parity_seed=None)
    tm = load_exported(tmp_path / "exp")
    got = tm.stream(np.asarray(feats), n, chunk, teacher={k: np.asarray(v) for k, v in tch.items()})
    np.testing.assert_allclose(got["code_logits"], out.code_logits, atol=1e-4)
    free_j = run_streaming(model, feats, n, chunk)
    free_t = tm.stream(np.asarray(feats), n, chunk)
    np.testing.assert_array_equal(free_t["codes"], free_j.codes)

    # 經 Streamer 自由執行逐幀前進（最後一個區塊等前瞻，所以少一個區塊）：快取有界。
    st = Streamer(tm, chunk)
    frames = st.push_mel(np.asarray(feats))
    prev = {
        "text": torch.zeros((1, 1), dtype=torch.long),
        "tones": torch.zeros((1, 1, 4), dtype=torch.long),
        "codes": torch.zeros((1, 1, 1), dtype=torch.long),
        "codes_valid": torch.zeros((1, 1), dtype=torch.bool),
    }
    for f in range(frames.shape[1]):
        res = st.step(frames[:, f : f + 1], prev)
        prev = {**prev, "text": res["text"].argmax(-1), "codes": res["code_ids"].long()}
    sizes = st.cache_sizes()
    assert frames.shape[1] == n - chunk and sizes["llm"] == sizes["talker"] == 2 + 5 - 1


def test_audio_longer_than_encoder_window_is_encoded_in_windows(tmp_path) -> None:
    # 編碼器上限 16 個輸出框 → 一窗 8 個 LLM 幀；20 幀的音訊切成 8 + 8 + 4 三窗。
    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.qwen.vocab_size = 256
    mc.speech.codebook_size = 64
    mc.whisper.max_source_positions = 16
    # 舊匯出的作法（無界編碼器與 LLM 脈絡）：切窗編碼。
    mc.streaming = dict(encoder_left_chunks=0, llm_window_frames=0)
    model = SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    b, n, chunk = 1, 20, 4
    stack = model.connector.stack
    assert encoder_window_frames(model, chunk) == 8
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    with pytest.raises(ValueError, match="max_source_positions"):
        model.encode_audio(feats, chunk_frames=chunk * stack)
    # 逐窗：每窗獨立以區塊因果遮罩編碼（位置從 0 起），串接。
    parts = [
        model.encode_audio(feats[:, :, 4 * s : 4 * min(s + 8, n)], chunk_frames=chunk * stack)[0]
        for s in range(0, n, 8)
    ]
    user = jnp.concatenate(parts, axis=1)
    np.testing.assert_allclose(
        np.asarray(encode_user_stream(model, feats, n, chunk)), np.asarray(user), atol=1e-5
    )
    # 教師強制的串流：LLM 的上下文跨窗連續，每幀 logits 等於逐窗特徵上的整段 LLM 前向。
    teacher = _teacher(rng, b, n)
    out = run_streaming(model, feats, n, chunk, teacher=teacher)
    text_in, tones_in, codes_in = teacher["text_in"], teacher["tones_in"], teacher["codes_in"]
    valid, target = teacher["codes_in_valid"], teacher["codes_target"]
    x = model.frame_inputs(user, text_in, tones_in, codes_in, valid)
    hidden, _ = model.llm.forward_embeds(x, attention_mask=jnp.ones((b, n), bool))
    full = model.heads(hidden, target, user, jnp.ones((b, n), bool))
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    np.testing.assert_allclose(out.turn_logits, np.asarray(full["turn"]), atol=1e-4)
    free = run_streaming(model, feats, n, chunk, keep_text_logits=False)
    assert free.text_logits is None and free.turn.shape == (b, n)

    # PyTorch 孿生：heads_config.json 沒有串流欄位的舊匯出照樣載入，`Streamer` 退回同樣的切窗
    # 編碼（梅爾分次餵入），逐窗特徵與教師強制的每幀 logits 都與 JAX 相同。
    import json

    import torch

    from export.to_torch import export_model
    from export.torch_model import Streamer, load_exported

    export_model(model, tmp_path / "old", parity_seed=None)
    path = tmp_path / "old" / "heads_config.json"
    heads = json.loads(path.read_text(encoding="utf-8"))
    for key in (
        "stream_chunk_frames",
        "encoder_left_chunks",
        "llm_sink_frames",
        "llm_window_frames",
    ):
        heads.pop(key)
    path.write_text(json.dumps(heads), encoding="utf-8")
    tm = load_exported(tmp_path / "old")
    assert tm.cfg.encoder_left_chunks == 0 and tm.llm_window is None
    st = Streamer(tm, chunk)
    mel = np.asarray(feats)
    pieces = [st.push_mel(mel[:, :, i : i + 5]) for i in range(0, mel.shape[2], 5)]
    tuser = torch.cat([*pieces, st.flush()], dim=1)
    np.testing.assert_allclose(tuser[:, :n].numpy(), np.asarray(user), atol=1e-4)
    assert st.cache_sizes()["mel"] == 0 and st.cache_sizes()["encoder"] == 0
    got = tm.stream(mel, n, chunk, teacher={k: np.asarray(v) for k, v in teacher.items()})
    np.testing.assert_allclose(got["text_logits"], out.text_logits, atol=1e-4)
    np.testing.assert_allclose(got["turn_logits"], out.turn_logits, atol=1e-4)
