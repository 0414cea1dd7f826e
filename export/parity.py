"""JAX `SpeakLLM` 與 PyTorch 孿生 `TorchSpeakLLM` 的數值一致性檢查（隨機輸入，fp32）。

量測項目（皆為最大絕對差）：

- `asr`：第 0 階段 ASR 前向的文字 logits（第二筆的梅爾與文字都帶填充）。
- `duplex`：全雙工整段前向（教師強制）的 `text`、`codes`、`turn`、`tones`、（有情緒頭時）`emotion`
  與 `hidden`；含情緒條件嵌入與填充幀。
- `duplex_chunked`：同上但編碼器用區塊因果遮罩。
- `streaming_teacher`：短對話逐幀串流（KV 快取、區塊編碼、教師強制、情緒條件），每一步的文字／輪替／
  語音碼 logits 對 JAX `run_streaming(..., teacher=...)`；`per_step` 列出每一幀的最大差。
- `streaming_free`：自由執行（貪婪選字、深度 Transformer 或 talker 產生語音碼）；記錄各幀選出的
  符號、輪替與語音碼是否完全相同，以及 logits 差。
- `talker_interleaved`（只有 `speech_head="cosyvoice2"`）：talker 單獨以 CosyVoice2 的交錯序列
  前向（文字／語音／sos／task 混合、帶填充、文字位置有思考者隱狀態融合）的語音詞表 logits，
  驗證 `talker/` 的官方 `llm.pt` 鍵佈局在原生用法下也一致。

cosyvoice2 的全雙工與串流檢查另帶 `text_out`（思考者每幀輸出的文字，talker 的融合輸入）；
語音碼為 1 個碼本、6564 個碼，talker 以自己的 KV 快取逐幀前進。

`max_abs_diff` 為以上所有 logits 差的最大值。
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from speakllm_jax.models.speakllm import SpeakLLM
from speakllm_jax.models.streaming import run_streaming


def fp32_copy(model: Any) -> Any:
    """計算精度不是 fp32 時，回傳參數相同、以 fp32 計算的 JAX 模型副本；否則原樣回傳。"""
    c = model.cfg
    talker = getattr(c, "talker", None)
    dtypes = [c.qwen.dtype, c.whisper.dtype] + ([talker.qwen.dtype] if talker else [])
    if all(jnp.dtype(d) == jnp.float32 for d in dtypes):
        return model
    extra = {}
    if talker is not None:
        extra["talker"] = talker.replace(qwen=talker.qwen.replace(dtype=jnp.float32))
    cfg = dataclasses.replace(
        c,
        whisper=c.whisper.replace(dtype=jnp.float32),
        qwen=c.qwen.replace(dtype=jnp.float32),
        **extra,
    )
    copy = nnx.eval_shape(lambda: SpeakLLM(cfg, rngs=nnx.Rngs(0)))
    state = jax_tree_to_f32(nnx.state(model))
    nnx.update(copy, state)
    return copy


def jax_tree_to_f32(state: Any) -> Any:
    def cast(x: Any) -> Any:
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, state)


def _diff(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b.detach().cpu().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"形狀不同：JAX {a.shape}，PyTorch {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _inputs(model: Any, rng: np.random.Generator, b: int, n: int) -> dict[str, np.ndarray]:
    """全雙工前向的隨機輸入（`n` 個 LLM 幀、`4n` 個梅爾框）。"""
    c = model.cfg
    stack = c.connector_stack
    f = 2 * stack * n
    q, cs = c.speech.num_codebooks, c.speech.codebook_size
    feats = rng.normal(size=(b, c.whisper.num_mel_bins, f)).astype(np.float32)
    fmask = np.ones((b, f), bool)
    frame_mask = np.ones((b, n), bool)
    if b > 1:
        fmask[1, f - 2 * stack * 2 :] = False
        frame_mask[1, n - 2 :] = False
    out = {
        "features": feats,
        "feature_mask": fmask,
        "text_in": rng.integers(0, c.qwen.vocab_size, (b, n)).astype(np.int32),
        "tones_in": rng.integers(0, 6, (b, n, c.max_chars_per_token)).astype(np.int32),
        "codes_in": rng.integers(0, cs, (b, n, q)).astype(np.int32),
        "codes_in_valid": rng.random((b, n)) < 0.6,
        "codes_target": rng.integers(0, cs, (b, n, q)).astype(np.int32),
        "frame_mask": frame_mask,
        "cond_ids": rng.integers(0, c.qwen.vocab_size, (b,)).astype(np.int32),
    }
    if c.speech_head == "cosyvoice2":
        # 思考者每幀輸出的文字（talker 的融合輸入）；只在 cosyvoice2 抽，voila 的亂數序列不變。
        out["text_out"] = rng.integers(0, c.qwen.vocab_size, (b, n)).astype(np.int32)
    return out


def check_asr(jax_model: Any, torch_model: Any, rng: np.random.Generator) -> dict[str, float]:
    """ASR 前向的 logits 差。"""
    c = jax_model.cfg
    b, f, length = 2, 40, 5
    v = c.qwen.vocab_size
    feats = rng.normal(size=(b, c.whisper.num_mel_bins, f)).astype(np.float32)
    fmask = np.ones((b, f), bool)
    fmask[1, f - 12 :] = False
    prefix = rng.integers(0, v, (2,)).astype(np.int32)
    suffix = rng.integers(0, v, (1,)).astype(np.int32)
    text = rng.integers(0, v, (b, length)).astype(np.int32)
    tmask = np.ones((b, length), bool)
    tmask[1, length - 2 :] = False
    args = (feats, fmask, prefix, suffix, text, tmask)
    ref = jax_model.asr_logits(*(jnp.asarray(a) for a in args))
    got = torch_model.asr_logits(*args)
    return {"logits": _diff(ref, got)}


def check_duplex(
    jax_model: Any,
    torch_model: Any,
    rng: np.random.Generator,
    chunk_frames: int | None = None,
) -> dict[str, float]:
    """全雙工整段前向各頭的差。"""
    x = _inputs(jax_model, rng, 2, 12)
    keys = (
        "features",
        "feature_mask",
        "text_in",
        "tones_in",
        "codes_in",
        "codes_in_valid",
        "codes_target",
        "frame_mask",
    )
    cosy = jax_model.cfg.speech_head == "cosyvoice2"
    text_out = x.get("text_out")
    ref = jax_model.duplex_forward(
        *(jnp.asarray(x[k]) for k in keys),
        cond_ids=jnp.asarray(x["cond_ids"]),
        chunk_frames=chunk_frames,
        **({"text_out": jnp.asarray(text_out)} if cosy else {}),
    )
    got = torch_model.duplex_forward(
        *(x[k] for k in keys),
        cond_ids=x["cond_ids"],
        chunk_frames=chunk_frames,
        text_out=text_out,
    )
    if set(ref) != set(got):
        raise ValueError(f"輸出鍵不同：JAX {sorted(ref)}，PyTorch {sorted(got)}")
    return {k: _diff(ref[k], got[k]) for k in sorted(ref)}


def check_streaming(
    jax_model: Any,
    torch_model: Any,
    rng: np.random.Generator,
    frames: int = 8,
    chunk_frames: int = 4,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """逐幀串流：教師強制與自由執行各一次，回傳兩份報告。"""
    x = _inputs(jax_model, rng, 1, frames)
    pad = int(torch_model.cfg.pad_id)
    keys = ["text_in", "tones_in", "codes_in", "codes_in_valid", "codes_target"]
    if jax_model.cfg.speech_head == "cosyvoice2":
        keys.append("text_out")
    teacher = {k: x[k] for k in keys}
    cond = x["cond_ids"]
    ref = run_streaming(
        jax_model, x["features"], frames, chunk_frames, teacher=teacher, cond_ids=cond, pad_id=pad
    )
    got = torch_model.stream(
        x["features"], frames, chunk_frames, teacher=teacher, cond_ids=cond, pad_id=pad
    )
    per_step = []
    for t in range(frames):
        per_step.append(
            max(
                _diff(ref.text_logits[:, t], got["text_logits"][:, t]),
                _diff(ref.turn_logits[:, t], got["turn_logits"][:, t]),
                _diff(ref.code_logits[:, t], got["code_logits"][:, t]),
            )
        )
    teacher_report = {
        "text": _diff(ref.text_logits, got["text_logits"]),
        "turn": _diff(ref.turn_logits, got["turn_logits"]),
        "codes": _diff(ref.code_logits, got["code_logits"]),
        "per_step": per_step,
    }
    ref_f = run_streaming(jax_model, x["features"], frames, chunk_frames, pad_id=pad)
    got_f = torch_model.stream(x["features"], frames, chunk_frames, pad_id=pad)
    same = (
        np.array_equal(ref_f.text, got_f["text"])
        and np.array_equal(ref_f.turn, got_f["turn"])
        and np.array_equal(ref_f.codes, got_f["codes"])
    )
    free_report = {
        "text": _diff(ref_f.text_logits, got_f["text_logits"]),
        "turn": _diff(ref_f.turn_logits, got_f["turn_logits"]),
        "ids_equal": bool(same),
    }
    return teacher_report, free_report


def check_talker_interleaved(
    jax_model: Any, torch_model: Any, rng: np.random.Generator
) -> dict[str, float]:
    """cosyvoice2：talker 單獨以交錯序列前向（含融合、填充）的 logits 差。"""
    talker = jax_model.speech_head
    tc = talker.cfg
    b, length = 2, 14
    kind = rng.integers(0, 2, (b, length)).astype(np.int32)  # 文字或語音
    kind[:, 0] = 2  # sos
    kind[:, 5] = 3  # task_id
    text_ids = rng.integers(0, tc.qwen.vocab_size, (b, length))
    speech_ids = rng.integers(0, tc.num_speech_tokens, (b, length))
    ids = np.where(kind == 0, text_ids, speech_ids).astype(np.int32)
    mask = np.ones((b, length), bool)
    mask[1, length - 4 :] = False
    hidden = rng.normal(size=(b, length, tc.thinker_hidden)).astype(np.float32)
    ref = talker.forward_interleaved(
        jnp.asarray(ids), jnp.asarray(kind), jnp.asarray(mask), jnp.asarray(hidden)
    )
    with torch.no_grad():
        got = torch_model.talker.forward_interleaved(
            torch.from_numpy(ids).long(),
            torch.from_numpy(kind).long(),
            torch.from_numpy(mask),
            torch.from_numpy(hidden),
        )
    valid = mask[..., None]
    return {"logits": _diff(np.asarray(ref) * valid, got.numpy() * valid)}


def check_parity(jax_model: Any, torch_model: Any, seed: int = 0) -> dict[str, Any]:
    """執行全部檢查，回傳可寫成 JSON 的報告（`max_abs_diff` 為所有 logits 差的最大值）。"""
    rng = np.random.default_rng(seed)
    model = fp32_copy(jax_model)
    torch_model = torch_model.float()
    report: dict[str, Any] = {"seed": int(seed), "dtype": "float32"}
    report["asr"] = check_asr(model, torch_model, rng)
    if model.cfg.speech_head in ("voila", "cosyvoice2"):
        report["duplex"] = check_duplex(model, torch_model, rng)
        report["duplex_chunked"] = check_duplex(model, torch_model, rng, chunk_frames=4)
        report["streaming_teacher"], report["streaming_free"] = check_streaming(
            model, torch_model, rng
        )
    if model.cfg.speech_head == "cosyvoice2":
        report["talker_interleaved"] = check_talker_interleaved(model, torch_model, rng)
    diffs: list[float] = []
    for part in report.values():
        if isinstance(part, dict):
            diffs += [float(v) for k, v in part.items() if isinstance(v, float)]
    report["max_abs_diff"] = max(diffs)
    report["torch_version"] = torch.__version__
    return report
