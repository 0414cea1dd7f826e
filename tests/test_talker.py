"""CosyVoice2 talker：`llm.pt` 佈局讀寫、JAX 與 PyTorch 孿生一致、交錯規則、幀模式串流、
以及 speech_head="cosyvoice2" 的全雙工模型。"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

from configs.models import model_config
from export.convert_llm_pt import convert_llm_pt
from export.cosyvoice2 import talker as torch_talker
from export.cosyvoice2.talker import CosyVoice2TalkerTorch
from speakllm_jax.checkpoints.cosyvoice2_llm import load_cosyvoice2_llm, save_cosyvoice2_llm
from speakllm_jax.checkpoints.hf_io import path_str
from speakllm_jax.checkpoints.qwen2_hf import qwen2_config_to_hf
from speakllm_jax.data import interleave as il
from speakllm_jax.data.interleave import (
    IGNORE_ID,
    interleave_fixed,
    token_char_spans,
    tone_aware_text_chunks,
)
from speakllm_jax.models.cosyvoice2_talker import CosyVoice2Talker, TalkerConfig
from speakllm_jax.models.qwen2 import Qwen2Config
from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config
from speakllm_jax.models.streaming import run_streaming
from speakllm_jax.text.tokenizer import TextTokenizer
from speakllm_jax.training.sharding import make_mesh

TOL = 1e-4
SPEECH = 61  # 小型語音碼數：詞表 61 + 3 = 64，eos 61、fill 63
THINKER = 48
QWEN = Qwen2Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=512,
)


def _cfg(thinker: int = 0) -> TalkerConfig:
    return TalkerConfig(qwen=QWEN, speech_token_size=SPEECH, thinker_hidden=thinker)


def _torch_twin(thinker: int = 0, seed: int = 0) -> CosyVoice2TalkerTorch:
    """隨機化所有參數（含偏置與正規化權重）的 PyTorch 孿生。"""
    torch.manual_seed(seed)
    m = CosyVoice2TalkerTorch.from_hf_dict(
        qwen2_config_to_hf(QWEN), speech_token_size=SPEECH, thinker_hidden=thinker
    ).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return m


def _randomize_jax(model: nnx.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name, v = path_str(path), np.asarray(var.get_value())
        if name.endswith("norm.weight"):
            new = 1.0 + 0.1 * rng.standard_normal(v.shape)
        elif name.endswith("bias"):
            new = 0.05 * rng.standard_normal(v.shape)
        else:
            new = 0.08 * rng.standard_normal(v.shape)
        flat.append((path, var.replace(jnp.asarray(new, v.dtype))))
    nnx.update(model, nnx.from_flat_state(flat))


def _official_keys(n_layers: int) -> set[str]:
    """官方 Qwen2LM.state_dict() 的鍵（由 CosyVoice `llm.py` 的模組結構寫出）。"""
    keys = {
        "llm_embedding.weight",
        "speech_embedding.weight",
        "llm_decoder.weight",
        "llm_decoder.bias",
        "llm.model.model.embed_tokens.weight",
        "llm.model.model.norm.weight",
        "llm.model.lm_head.weight",
    }
    for i in range(n_layers):
        pre = f"llm.model.model.layers.{i}."
        for proj in "qkv":
            keys |= {pre + f"self_attn.{proj}_proj.weight", pre + f"self_attn.{proj}_proj.bias"}
        keys.add(pre + "self_attn.o_proj.weight")
        keys |= {pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"}
    return keys


def _batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """兩條交錯序列（一條 bistream、一條 unistream），右填充。"""
    seqs = [
        interleave_fixed(
            rng.integers(0, 256, 7),
            rng.integers(0, SPEECH, 30),
            fill_id=SPEECH + 2,
            task_id=1,
            eos_id=SPEECH,
            sos_id=0,
        ),
        interleave_fixed(
            rng.integers(0, 256, 6),
            rng.integers(0, SPEECH, 9),
            fill_id=SPEECH + 2,
            task_id=1,
            eos_id=SPEECH,
            sos_id=0,
        ),
    ]
    assert [s["mode"] for s in seqs] == ["bistream", "unistream"]
    n = max(len(s["input_ids"]) for s in seqs)
    ids = np.zeros((2, n), np.int64)
    kind = np.zeros((2, n), np.int64)
    mask = np.zeros((2, n), bool)
    for b, s in enumerate(seqs):
        k = len(s["input_ids"])
        ids[b, :k], kind[b, :k], mask[b, :k] = s["input_ids"], s["input_kind"], True
    return {"ids": ids, "kind": kind, "mask": mask}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory) -> tuple[Path, CosyVoice2TalkerTorch]:
    """PyTorch 孿生以官方佈局 `torch.save(state_dict)` 寫成的 llm.pt（沒有融合鍵），
    以 `export.convert_llm_pt` 轉成的 safetensors（JAX 端讀這個）。"""
    twin = _torch_twin(0, seed=1)
    path = tmp_path_factory.mktemp("cv2") / "llm.pt"
    torch.save(twin.state_dict(), path)
    return convert_llm_pt(path), twin


def test_special_ids_and_kinds_match_reference() -> None:
    cfg = TalkerConfig.cosyvoice2()
    # Qwen2LM：eos = speech_token_size、fill = speech_token_size + 2、詞表 + 3。
    assert (cfg.eos_id, cfg.fill_id, cfg.num_speech_tokens) == (6561, 6563, 6564)
    assert cfg.qwen.hidden_size == 896 and cfg.qwen.tie_word_embeddings
    kinds = ("KIND_TEXT", "KIND_SPEECH", "KIND_SOS", "KIND_TASK")
    assert [getattr(il, k) for k in kinds] == [getattr(torch_talker, k) for k in kinds]


def test_official_layout_loads_with_parity_interleaved(official_pt) -> None:
    path, twin = official_pt
    sd = torch.load(path.with_suffix(".pt"), weights_only=True)
    converted = safetensors.torch.load_file(path)
    assert set(converted) == set(sd)  # 轉換保留每個鍵與值（綁定的 lm_head 也各自一份）
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    assert set(sd) == _official_keys(QWEN.num_hidden_layers)
    assert tuple(sd["llm_embedding.weight"].shape) == (2, 64)
    assert tuple(sd["speech_embedding.weight"].shape) == (SPEECH + 3, 64)
    model = load_cosyvoice2_llm(path, _cfg())
    batch = _batch(np.random.default_rng(0))
    got = np.asarray(
        model.forward_interleaved(
            jnp.asarray(batch["ids"]), jnp.asarray(batch["kind"]), jnp.asarray(batch["mask"])
        )
    )
    with torch.no_grad():
        ref = twin.forward_interleaved(
            _t(batch["ids"]), _t(batch["kind"]), _t(batch["mask"])
        ).numpy()
    m = batch["mask"]
    assert got.shape == (2, m.shape[1], SPEECH + 3)
    err = np.abs(got - ref)[m].max()
    assert err <= TOL, err


def test_official_file_fusion_init_reduces_to_cosyvoice2(official_pt) -> None:
    path, _ = official_pt
    plain = load_cosyvoice2_llm(path, _cfg())
    fused = load_cosyvoice2_llm(path, _cfg(THINKER))
    assert fused.fusion is not None and fused.cfg.thinker_hidden == THINKER
    batch = _batch(np.random.default_rng(1))
    args = (jnp.asarray(batch["ids"]), jnp.asarray(batch["kind"]), jnp.asarray(batch["mask"]))
    base = np.asarray(plain.forward_interleaved(*args))
    zero = jnp.zeros(batch["ids"].shape + (THINKER,), jnp.float32)
    np.testing.assert_allclose(np.asarray(fused.forward_interleaved(*args, zero)), base, atol=1e-6)
    h = jax.random.normal(jax.random.key(0), zero.shape)
    moved = np.asarray(fused.forward_interleaved(*args, h))
    assert np.abs(moved - base)[batch["mask"]].max() > 1e-3


def test_sharded_load_matches(official_pt) -> None:
    """在 8 個模擬裝置的網格上逐參數分片載入（融合參數新建後也分片），數值不變。"""
    path, _ = official_pt
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = load_cosyvoice2_llm(path, _cfg(THINKER), mesh=mesh)
    plain = load_cosyvoice2_llm(path, _cfg(THINKER))
    emb = sharded.speech_embedding.embedding[...]
    assert len(emb.sharding.device_set) == 8
    assert len(sharded.fusion.gate.kernel[...].sharding.device_set) == 8
    batch = _batch(np.random.default_rng(4))
    args = (jnp.asarray(batch["ids"]), jnp.asarray(batch["kind"]), jnp.asarray(batch["mask"]))
    with jax.set_mesh(mesh):
        got = np.asarray(sharded.forward_interleaved(*args))
    np.testing.assert_allclose(got, np.asarray(plain.forward_interleaved(*args)), atol=1e-5)


def test_fusion_parity_roundtrip_and_frames(tmp_path: Path) -> None:
    model = CosyVoice2Talker(_cfg(THINKER), rngs=nnx.Rngs(0))
    _randomize_jax(model, 3)
    st = save_cosyvoice2_llm(model, tmp_path / "llm.safetensors")
    twin = CosyVoice2TalkerTorch.from_hf_dict(
        qwen2_config_to_hf(QWEN), speech_token_size=SPEECH, thinker_hidden=THINKER
    ).eval()
    twin.load_state_dict(safetensors.torch.load_file(st), strict=True)
    with pytest.raises(ValueError, match="export.convert_llm_pt --reverse"):
        save_cosyvoice2_llm(model, tmp_path / "llm.pt")
    # 同鍵檔案載回得到相同參數
    again = load_cosyvoice2_llm(st, _cfg(THINKER))
    for (p1, v1), (p2, v2) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again)), strict=True
    ):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1.get_value()), np.asarray(v2.get_value()))

    rng = np.random.default_rng(2)
    batch = _batch(rng)
    h = rng.standard_normal(batch["ids"].shape + (THINKER,)).astype(np.float32)
    got = np.asarray(
        model.forward_interleaved(
            jnp.asarray(batch["ids"]),
            jnp.asarray(batch["kind"]),
            jnp.asarray(batch["mask"]),
            jnp.asarray(h),
        )
    )
    with torch.no_grad():
        ref = twin.forward_interleaved(
            _t(batch["ids"]), _t(batch["kind"]), _t(batch["mask"]), _t(h)
        ).numpy()
    assert np.abs(got - ref)[batch["mask"]].max() <= TOL

    b, n = 2, 9
    hid = rng.standard_normal((b, n, THINKER)).astype(np.float32)
    text = rng.integers(0, 256, (b, n))
    prev = rng.integers(0, SPEECH, (b, n))
    valid = rng.random((b, n)) > 0.4
    fmask = np.ones((b, n), bool)
    fmask[1, 7:] = False
    got = np.asarray(
        model.forward_frames(*(jnp.asarray(x) for x in (hid, text, prev, valid, fmask)))
    )
    with torch.no_grad():
        ref = twin.forward_frames(*(_t(x) for x in (hid, text, prev, valid, fmask))).numpy()
    assert got.shape == (b, n, SPEECH + 3)
    assert np.abs(got - ref)[fmask].max() <= TOL
    # 上一幀無效時用 sos 列：把無效幀的碼換掉不影響結果
    other = np.where(valid, prev, (prev + 5) % SPEECH)
    got2 = np.asarray(
        model.forward_frames(*(jnp.asarray(x) for x in (hid, text, other, valid, fmask)))
    )
    np.testing.assert_allclose(got2, got, atol=1e-6)

    # 逐幀快取：JAX 與孿生各自等於自己的整段前向
    full = np.asarray(model.forward_frames(*(jnp.asarray(x) for x in (hid, text, prev, valid))))
    cache = model.init_cache(b, n)
    step = nnx.jit(lambda m, c, *a: m.step(c, *a))
    steps = []
    for t in range(n):
        sl = slice(t, t + 1)
        lg, cache = step(model, cache, *(jnp.asarray(x[:, sl]) for x in (hid, text, prev, valid)))
        steps.append(np.asarray(lg[:, 0]))
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
    with torch.no_grad():
        tfull = twin.forward_frames(*(_t(x) for x in (hid, text, prev, valid))).numpy()
        tc = twin.new_cache()
        tsteps = []
        for t in range(n):
            lg, tc = twin.step(tc, *(_t(x[:, t : t + 1]) for x in (hid, text, prev, valid)))
            tsteps.append(lg[:, 0].numpy())
    np.testing.assert_allclose(np.stack(tsteps, 1), tfull, atol=1e-5)
    np.testing.assert_allclose(tfull, full, atol=TOL)


def test_strict_load_errors(official_pt, tmp_path: Path) -> None:
    path, _ = official_pt
    sd = torch.load(path.with_suffix(".pt"), weights_only=True)

    def save(d: dict, name: str) -> Path:
        p = tmp_path / name
        torch.save(d, p)
        return convert_llm_pt(p)

    # JAX 端不讀 pickle：一行錯誤指出轉換指令
    with pytest.raises(ValueError, match=r"python -m export\.convert_llm_pt --input .*llm\.pt"):
        load_cosyvoice2_llm(path.with_suffix(".pt"), _cfg())

    missing = {k: v for k, v in sd.items() if k != "llm_decoder.bias"}
    with pytest.raises(ValueError, match=r"缺少鍵 llm_decoder\.bias"):
        load_cosyvoice2_llm(save(missing, "missing.pt"), _cfg())
    extra = dict(sd, **{"llm.model.model.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"llm\.model\.model\.extra\.weight"):
        load_cosyvoice2_llm(save(extra, "extra.pt"), _cfg())
    bad = dict(sd, **{"speech_embedding.weight": torch.zeros(SPEECH + 2, 64)})
    with pytest.raises(ValueError, match=r"speech_embedding\.weight 形狀不符"):
        load_cosyvoice2_llm(save(bad, "bad.pt"), _cfg())
    partial = dict(sd, **{"fusion.gate.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"缺少鍵 fusion\."):
        load_cosyvoice2_llm(save(partial, "partial.pt"), _cfg(THINKER))
    # 有融合鍵但設定沒有融合模組：多出的鍵
    with pytest.raises(ValueError, match=r"fusion\.gate\.bias"):
        load_cosyvoice2_llm(save(partial, "partial2.pt"), _cfg())
    with pytest.raises(ValueError, match="state_dict"):
        load_cosyvoice2_llm(save([1, 2], "list.pt"), _cfg())  # type: ignore[arg-type]
    # 綁定詞嵌入時官方的 lm_head 鍵被忽略；未綁定時它必須存在且被載入
    untied = TalkerConfig(qwen=QWEN.replace(tie_word_embeddings=False), speech_token_size=SPEECH)
    m = load_cosyvoice2_llm(path, untied)
    np.testing.assert_array_equal(
        np.asarray(m.llm.lm_head.kernel[...]), sd["llm.model.lm_head.weight"].numpy().T
    )


def _reference_scheme(text: list[int], speech: list[int], bistream: bool) -> tuple[list, list]:
    """直接照 CosyVoice2 `prepare_lm_input_target` 的規則寫出（輸入標記, 目標）。

    輸入以 ("sos"|"task"|"t"|"s", 值) 表示；fill = 63、eos = 61（小型語音詞表）。
    """
    fill, eos = SPEECH + 2, SPEECH
    inp: list = [("sos", 0)]
    tgt: list = [IGNORE_ID]
    if not bistream:
        inp += [("t", x) for x in text] + [("task", 1)] + [("s", x) for x in speech]
        tgt += [IGNORE_ID] * len(text) + speech + [eos]
        return inp, tgt
    n_chunks = int(np.ceil((len(text) + 1) / 5))
    for j in range(n_chunks):
        tt = text[j * 5 : (j + 1) * 5]
        ss = speech[j * 15 : (j + 1) * 15]
        if len(tt) == 5:
            tgt += [IGNORE_ID] * 4 + ss + [fill]
            inp += [("t", x) for x in tt] + [("s", x) for x in ss]
        else:
            tgt += [IGNORE_ID] * len(tt) + speech[j * 15 :] + [eos]
            inp += [("t", x) for x in tt] + [("task", 1)] + [("s", x) for x in speech[j * 15 :]]
    return inp, tgt


@pytest.mark.parametrize("t_len,s_len", [(7, 30), (10, 31), (3, 10), (12, 37), (6, 18), (4, 9)])
def test_interleave_matches_reference_scheme(t_len: int, s_len: int) -> None:
    rng = np.random.default_rng(t_len * 100 + s_len)
    text = rng.integers(100, 200, t_len).tolist()
    speech = rng.integers(0, SPEECH, s_len).tolist()
    out = interleave_fixed(text, speech, fill_id=SPEECH + 2, task_id=1, eos_id=SPEECH, sos_id=0)
    bistream = s_len / t_len > 15 / 5
    assert out["mode"] == ("bistream" if bistream else "unistream")
    inp, tgt = _reference_scheme(text, speech, bistream)
    names = {il.KIND_SOS: "sos", il.KIND_TASK: "task", il.KIND_TEXT: "t", il.KIND_SPEECH: "s"}
    got = [(names[k], int(i)) for k, i in zip(out["input_kind"], out["input_ids"], strict=True)]
    assert got == inp
    assert out["target_ids"].tolist() == tgt
    # 明確給出與預設相同的塊大小，結果不變
    same = interleave_fixed(
        text,
        speech,
        fill_id=SPEECH + 2,
        task_id=1,
        eos_id=SPEECH,
        sos_id=0,
        text_chunks=[5] * (t_len // 5),
    )
    assert same["input_ids"].tolist() == out["input_ids"].tolist()
    assert same["target_ids"].tolist() == out["target_ids"].tolist()


def test_tone_aware_chunks_never_split_han(qwen_tokenizer_dir) -> None:
    tok = TextTokenizer.from_dir(qwen_tokenizer_dir)
    text = "我們在龘龘的山上看見𪚥字，好嗎？今天天氣很好"
    ids = tok.encode(text)
    tb = tok.token_bytes(ids)
    spans = token_char_spans(text, tb)
    n = len(ids)

    def legal(b: int) -> bool:
        return b in (0, n) or spans[b - 1, 1] <= spans[b, 0]

    def decodes(parts: list[bytes]) -> bool:
        try:
            b"".join(parts).decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    # 參考的每 5 個一塊會把「龘」的位元組切到兩塊
    assert not legal(5)
    assert not decodes(tb[:5])
    chunks = tone_aware_text_chunks(text, spans)
    # 由規則逐步推出期望：目標 p + 5，取距離最近（同距離取前者）的合法邊界
    exp, p = [], 0
    while n - p >= 5:
        cands = [b for b in range(max(p + 1, p + 3), min(n, p + 7) + 1) if legal(b)]
        best = min(cands, key=lambda b: (abs(b - (p + 5)), b))
        exp.append(best - p)
        p = best
    assert chunks == exp
    assert chunks[0] == 4  # 「龘」之前
    bounds = np.cumsum([0] + chunks + [n - sum(chunks)])
    for a, e in zip(bounds[:-1], bounds[1:], strict=True):
        assert decodes(tb[a:e]), (a, e)
    # 交錯序列：每塊文字之後接 15 個語音與 fill，剩下的文字接 task_id
    speech = [i % 50 for i in range(15 * len(chunks) + 7)]
    out = interleave_fixed(
        ids, speech, fill_id=SPEECH + 2, task_id=1, eos_id=SPEECH, sos_id=0, text_chunks=chunks
    )
    kind = out["input_kind"].tolist()
    runs, cur = [], None
    for k in kind:
        if cur is None or cur[0] != k:
            cur = [k, 0]
            runs.append(cur)
        cur[1] += 1
    text_runs = [c for k, c in runs if k == il.KIND_TEXT]
    assert text_runs == chunks + [n - sum(chunks)]
    assert out["target_ids"].tolist().count(SPEECH + 2) == len(chunks)
    assert out["target_ids"][-1] == SPEECH and kind.count(il.KIND_TASK) == 1
    # 語音不足以撐起所有塊時，塊數受限
    capped = tone_aware_text_chunks(text, spans, num_speech=31)
    assert capped == chunks[:2]


def test_speakllm_cosyvoice2_duplex_and_streaming() -> None:
    mc = model_config("tiny")
    mc.speech_head = "cosyvoice2"
    mc.qwen.vocab_size = 256
    mc.talker.qwen.vocab_size = 256
    mc.talker.speech_token_size = SPEECH
    cfg = build_speakllm_config(mc)
    assert cfg.speech.num_codebooks == 1 and cfg.speech.codebook_size == SPEECH + 3
    assert cfg.talker.thinker_hidden == cfg.qwen.hidden_size
    model = SpeakLLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, n, chunk = 2, 8, 4
    c = SPEECH + 3
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    text_in = jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32)
    text_out = jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32)
    tones_in = jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32)
    codes_in = jnp.asarray(rng.integers(0, SPEECH, (b, n, 1)), jnp.int32)
    valid = jnp.asarray(rng.random((b, n)) > 0.3)
    target = jnp.asarray(rng.integers(0, SPEECH, (b, n, 1)), jnp.int32)
    args = (
        feats,
        jnp.ones((b, 4 * n), bool),
        text_in,
        tones_in,
        codes_in,
        valid,
        target,
        jnp.ones((b, n), bool),
    )
    with pytest.raises(ValueError, match="text_out"):
        model.duplex_forward(*args)
    full = model.duplex_forward(
        *args, chunk_frames=chunk * model.connector.stack, text_out=text_out
    )
    assert full["codes"].shape == (b, n, 1, c)
    # 說話頭確實接收思考者隱狀態與文字：與直接呼叫 talker 的幀模式相同
    direct = model.speech_head.forward_frames(full["hidden"], text_out, codes_in[..., 0], valid)
    np.testing.assert_allclose(np.asarray(full["codes"][:, :, 0]), np.asarray(direct), atol=1e-5)
    teacher = dict(
        text_in=text_in,
        tones_in=tones_in,
        codes_in=codes_in,
        codes_in_valid=valid,
        codes_target=target,
        text_out=text_out,
    )
    out = run_streaming(model, feats, n, chunk, teacher=teacher)
    np.testing.assert_allclose(out.code_logits, np.asarray(full["codes"]), atol=1e-4)
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    free = run_streaming(model, feats, n, chunk)
    assert free.codes.shape == (b, n, 1)
    assert free.codes.min() >= 0 and free.codes.max() < SPEECH
