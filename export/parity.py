"""JAX `SpeakLLM` 與 PyTorch 孿生 `TorchSpeakLLM` 的數值一致性檢查（隨機輸入，fp32）。

量測項目（皆為最大絕對差）：

- `asr`：第 0 階段 ASR 前向的文字 logits（第二筆的梅爾與文字都帶填充）。
- `duplex`：全雙工整段前向（教師強制）的 `text`、`codes`、`turn`、`tones`、（有情緒頭時）`emotion`
  與 `hidden`；含情緒條件嵌入與填充幀。
- `duplex_chunked`：同上但編碼器用區塊因果遮罩。
- `streaming_teacher`：短對話逐幀串流（KV 快取、區塊編碼、教師強制、情緒條件），每一步的文字／輪替／
  語音碼 logits 對 JAX `run_streaming(..., teacher=...)`；`per_step` 列出每一幀的最大差。
- `streaming_free`：自由執行（貪婪選字、深度 Transformer 產生語音碼）；記錄各幀選出的符號、
  輪替與語音碼是否完全相同，以及 logits 差。

`max_abs_diff` 為以上所有 logits 差的最大值。
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def fp32_copy(model: Any) -> Any:
    """計算精度不是 fp32 時，回傳參數相同、以 fp32 計算的 JAX 模型副本；否則原樣回傳。"""
    import jax.numpy as jnp
    from flax import nnx

    from speakllm_jax.models.speakllm import SpeakLLM

    c = model.cfg
    if jnp.dtype(c.qwen.dtype) == jnp.float32 and jnp.dtype(c.whisper.dtype) == jnp.float32:
        return model
    cfg = dataclasses.replace(
        c,
        whisper=c.whisper.replace(dtype=jnp.float32),
        qwen=c.qwen.replace(dtype=jnp.float32),
    )
    copy = nnx.eval_shape(lambda: SpeakLLM(cfg, rngs=nnx.Rngs(0)))
    state = jax_tree_to_f32(nnx.state(model))
    nnx.update(copy, state)
    return copy


def jax_tree_to_f32(state: Any) -> Any:
    import jax
    import jax.numpy as jnp

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
    return {
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


def check_asr(jax_model: Any, torch_model: Any, rng: np.random.Generator) -> dict[str, float]:
    """ASR 前向的 logits 差。"""
    import jax.numpy as jnp

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
    import jax.numpy as jnp

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
    ref = jax_model.duplex_forward(
        *(jnp.asarray(x[k]) for k in keys),
        cond_ids=jnp.asarray(x["cond_ids"]),
        chunk_frames=chunk_frames,
    )
    got = torch_model.duplex_forward(
        *(x[k] for k in keys), cond_ids=x["cond_ids"], chunk_frames=chunk_frames
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
    from speakllm_jax.models.streaming import run_streaming

    x = _inputs(jax_model, rng, 1, frames)
    pad = int(torch_model.cfg.pad_id)
    teacher = {
        k: x[k] for k in ("text_in", "tones_in", "codes_in", "codes_in_valid", "codes_target")
    }
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


def check_parity(jax_model: Any, torch_model: Any, seed: int = 0) -> dict[str, Any]:
    """執行全部檢查，回傳可寫成 JSON 的報告（`max_abs_diff` 為所有 logits 差的最大值）。"""
    import torch

    rng = np.random.default_rng(seed)
    model = fp32_copy(jax_model)
    torch_model = torch_model.float()
    report: dict[str, Any] = {"seed": int(seed), "dtype": "float32"}
    report["asr"] = check_asr(model, torch_model, rng)
    if model.cfg.speech_head == "voila":
        report["duplex"] = check_duplex(model, torch_model, rng)
        report["duplex_chunked"] = check_duplex(model, torch_model, rng, chunk_frames=4)
        report["streaming_teacher"], report["streaming_free"] = check_streaming(
            model, torch_model, rng
        )
    diffs: list[float] = []
    for part in report.values():
        if isinstance(part, dict):
            diffs += [float(v) for k, v in part.items() if isinstance(v, float)]
    report["max_abs_diff"] = max(diffs)
    report["torch_version"] = torch.__version__
    return report
