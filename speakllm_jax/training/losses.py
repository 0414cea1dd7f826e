"""研究損失：重疊感知（Overlap-Aware）的逐幀輪替目標與權重，以及 JAX 損失函式。

逐幀目標（NumPy，資料端產生）：`overlap_aware_targets` 由一段對話的 turns／overlaps 產生
`turn_targets [N]`、`speech_weight [N]`、`turn_weight [N]`（助理的觀點，25 Hz 幀格）。

- 預設每幀為 LISTEN；助理的每個發言段 [s, e) 在 s 為 SPEAK、(s, e) 為 CONTINUE；
  助理自己的附和（turn kind 為 "backchannel"，或 overlaps 中 by="assistant" 的 backchannel）為 BACKCHANNEL。
- 使用者搶話（overlap kind "barge_in"，by="user"）且起點 o 落在助理發言段 [s, e) 內：
  幀 [o, o + R) 為 YIELD（R = `reaction_frames`），其後到該發言段結束 [o + R, e) 為 LISTEN，
  且 `speech_weight` 在 [o + R, e) 為 0（助理不該再說的語音不當作目標）。
  搶話起點不在助理發言段內時（助理本來就沒在說）不做任何改變。
- 使用者附和（overlap kind "backchannel"，by="user"）不改變目標與語音權重：助理繼續說（CONTINUE）。
- `turn_weight`：搶話幀 [o, o + R) 與搶話重疊段為 `barge_in_weight`，使用者附和的重疊段為
  `backchannel_weight`，其餘為 1（兩者重疊時取較大者）。
- `ablation=True`：不做重疊處理，所有助理發言段都是 SPEAK／CONTINUE，其餘 LISTEN，兩種權重全為 1。

損失函式（JAX）：`masked_cross_entropy`、`dual_scale_loss`、`tone_aux_loss`、`turn_loss`；
都以 float32 計算 log-softmax，目標為 -1（IGNORE_ID）的位置權重自動為 0。
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from speakllm_jax.data.interleave import IGNORE_ID, seconds_to_end_frame, seconds_to_frame


class TurnAction(enum.IntEnum):
    """輪替頭的類別（助理的觀點）。"""

    LISTEN = 0
    SPEAK = 1
    CONTINUE = 2
    YIELD = 3
    BACKCHANNEL = 4


NUM_TURN_ACTIONS = len(TurnAction)


@dataclass(frozen=True)
class OverlapConfig:
    """重疊感知損失的設定。

    `reaction_frames`：搶話後允許的反應時間（幀），其間目標為 YIELD；
    `barge_in_weight`／`backchannel_weight`：輪替損失在兩種重疊幀上的權重；
    `ablation`：True 時關掉整個模組（純輪替目標、權重全 1）。
    """

    reaction_frames: int = 6
    barge_in_weight: float = 2.0
    backchannel_weight: float = 1.5
    ablation: bool = False


@dataclass(frozen=True)
class DualScaleConfig:
    """雙尺度規劃的設定：文字計畫領先語音碼 `lead_frames` 幀；語義（文字）與聲學（語音碼）各自的損失權重。

    `codebook_weights` 為四個碼本各自的權重（第一個碼本是語義碼本）；`lead_frames = 0` 為消融。
    """

    lead_frames: int = 2
    w_text: float = 1.0
    w_code: float = 1.0
    codebook_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)


@dataclass
class FrameTargets:
    """逐幀輪替目標與權重（長度都是 N）。"""

    turn_targets: np.ndarray  # [N] int32，TurnAction
    speech_weight: np.ndarray  # [N] float32
    turn_weight: np.ndarray  # [N] float32
    barge_in_frames: np.ndarray  # [B] int64，實際生效的搶話起點幀


def _span(turn: dict[str, Any], n: int) -> tuple[int, int]:
    s = min(max(seconds_to_frame(turn["start"]), 0), n)
    e = min(max(seconds_to_end_frame(turn["end"]), s), n)
    return s, e


def _check_turn(turn: Any, i: int) -> None:
    if not isinstance(turn, dict):
        raise ValueError(f"turns[{i}] 應為 dict，得到 {type(turn).__name__}")
    for k in ("speaker", "start", "end"):
        if k not in turn:
            raise ValueError(f"turns[{i}] 缺少欄位 {k!r}")
    if float(turn["end"]) < float(turn["start"]):
        raise ValueError(f"turns[{i}] 的 end {turn['end']} 早於 start {turn['start']}")


def overlap_aware_targets(
    turns: Sequence[dict[str, Any]],
    overlaps: Sequence[dict[str, Any]],
    num_frames: int,
    config: OverlapConfig | None = None,
    assistant: str = "assistant",
) -> FrameTargets:
    """由一段對話的 turns／overlaps 產生逐幀的輪替目標、語音權重與輪替權重（規則見模組說明）。"""
    cfg = config or OverlapConfig()
    n = int(num_frames)
    if n <= 0:
        raise ValueError(f"num_frames 必須 > 0，收到 {num_frames}")
    if cfg.reaction_frames < 1:
        raise ValueError(f"reaction_frames 必須 >= 1，收到 {cfg.reaction_frames}")
    targets = np.full(n, int(TurnAction.LISTEN), dtype=np.int32)
    speech_w = np.ones(n, dtype=np.float32)
    turn_w = np.ones(n, dtype=np.float32)
    a_spans: list[tuple[int, int]] = []
    for i, t in enumerate(turns):
        _check_turn(t, i)
        if t["speaker"] != assistant:
            continue
        s, e = _span(t, n)
        if e <= s:
            continue
        a_spans.append((s, e))
        if t.get("kind") == "backchannel" and not cfg.ablation:
            targets[s:e] = int(TurnAction.BACKCHANNEL)
        else:
            targets[s] = int(TurnAction.SPEAK)
            targets[s + 1 : e] = int(TurnAction.CONTINUE)
    barge: list[int] = []
    if cfg.ablation:
        return FrameTargets(targets, speech_w, turn_w, np.zeros(0, dtype=np.int64))
    for j, o in enumerate(overlaps):
        if not isinstance(o, dict) or "kind" not in o or "start" not in o or "end" not in o:
            raise ValueError(f"overlaps[{j}] 需要欄位 kind、start、end")
        kind = o["kind"]
        by = o.get("by", "user")
        s, e = _span(o, n)
        if kind == "backchannel":
            if by == assistant:
                targets[s:e] = int(TurnAction.BACKCHANNEL)
            else:
                turn_w[s:e] = np.maximum(turn_w[s:e], cfg.backchannel_weight)
        elif kind == "barge_in":
            if by == assistant:
                continue  # 助理搶使用者的話：不在本模組的範圍
            onset = min(max(seconds_to_frame(o.get("onset", o["start"])), 0), n - 1)
            host = [(a, b) for a, b in a_spans if a <= onset < b]
            if not host:
                continue
            _, end = host[0]
            r_end = min(onset + cfg.reaction_frames, n)
            targets[onset:r_end] = int(TurnAction.YIELD)
            targets[r_end:end] = int(TurnAction.LISTEN)
            speech_w[r_end:end] = 0.0
            turn_w[onset:r_end] = np.maximum(turn_w[onset:r_end], cfg.barge_in_weight)
            turn_w[s:e] = np.maximum(turn_w[s:e], cfg.barge_in_weight)
            barge.append(onset)
        else:
            raise ValueError(f"overlaps[{j}] 的 kind {kind!r} 不是 backchannel 或 barge_in")
    return FrameTargets(targets, speech_w, turn_w, np.asarray(barge, dtype=np.int64))


# ---------------------------------------------------------------- JAX 損失


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """加權交叉熵：回傳 (Σ w·CE, Σ w)。

    `logits [..., V]`、`targets [...]`（整數；-1 表示忽略）、`weights [...]`（可廣播到 targets，
    缺省為 1）。忽略位置的權重為 0；log-softmax 以 float32 計算。
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    targets = jnp.asarray(targets)
    valid = (targets != IGNORE_ID).astype(jnp.float32)
    w = (
        valid
        if weights is None
        else valid * jnp.broadcast_to(jnp.asarray(weights, jnp.float32), targets.shape)
    )
    safe = jnp.where(targets == IGNORE_ID, 0, targets).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w), jnp.sum(w)


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1e-8)


def dual_scale_loss(
    text_logits: jax.Array,
    text_targets: jax.Array,
    text_mask: jax.Array,
    code_logits: jax.Array,
    code_targets: jax.Array,
    code_weight: jax.Array,
    w_text: float = 1.0,
    w_code: float = 1.0,
    codebook_weights: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
    """雙尺度損失：語義尺度（幀上的文字計畫）＋聲學尺度（每幀的語音碼）。

    `text_logits [..., N, V]`、`text_targets [..., N]`、`text_mask [..., N]`；
    `code_logits [..., N, C, K]`（Voila：C = 4、K = 2048）、`code_targets [..., N, C]`、
    `code_weight [..., N]` 或 `[..., N, C]`；`codebook_weights [C]` 可選。
    text_loss = Σ mask·CE / Σ mask；code_loss = Σ w·cb·CE / Σ w·cb（所有碼本一起平均）；
    loss = w_text · text_loss + w_code · code_loss。另回傳各碼本的平均 `code_loss_per_codebook [C]`。
    """
    t_sum, t_cnt = masked_cross_entropy(text_logits, text_targets, text_mask)
    code_targets = jnp.asarray(code_targets)
    cw = jnp.asarray(code_weight, jnp.float32)
    if cw.ndim == code_targets.ndim - 1:
        cw = cw[..., None]
    cw = jnp.broadcast_to(cw, code_targets.shape)
    if codebook_weights is not None:
        cb = jnp.asarray(codebook_weights, jnp.float32)
        if cb.shape != (code_targets.shape[-1],):
            raise ValueError(f"codebook_weights 長度應為 {code_targets.shape[-1]}，得到 {cb.shape}")
        cw = cw * cb
    c_logits = jnp.asarray(code_logits).astype(jnp.float32)
    valid = (code_targets != IGNORE_ID).astype(jnp.float32) * cw
    safe = jnp.where(code_targets == IGNORE_ID, 0, code_targets).astype(jnp.int32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(c_logits, -1), safe[..., None], -1)[..., 0]
    per_cb_axes = tuple(range(nll.ndim - 1))
    per_cb = _mean(jnp.sum(nll * valid, axis=per_cb_axes), jnp.sum(valid, axis=per_cb_axes))
    c_sum, c_cnt = jnp.sum(nll * valid), jnp.sum(valid)
    text_loss, code_loss = _mean(t_sum, t_cnt), _mean(c_sum, c_cnt)
    return {
        "loss": w_text * text_loss + w_code * code_loss,
        "text_loss": text_loss,
        "code_loss": code_loss,
        "code_loss_per_codebook": per_cb,
        "text_count": t_cnt,
        "code_count": c_cnt,
    }


def tone_aux_loss(
    tone_logits: jax.Array, tones: jax.Array, weights: jax.Array | None = None
) -> dict[str, jax.Array]:
    """聲調輔助損失：`tone_logits [..., n, K, 6]`、`tones [..., n, K]`（0 = 無聲調／非漢字，不計；
    1–4 四聲、5 輕聲，與 `speakllm_jax.text.tones` 相同）。`weights [..., n]` 可選（例如符號遮罩）。

    回傳 loss（有聲調位置的平均 CE）、count、accuracy（有聲調位置的 argmax 正確率）。
    """
    tones = jnp.asarray(tones)
    w = (tones > 0).astype(jnp.float32)
    if weights is not None:
        w = w * jnp.asarray(weights, jnp.float32)[..., None]
    tgt = jnp.where(tones > 0, tones, IGNORE_ID)
    total, count = masked_cross_entropy(tone_logits, tgt, w)
    pred = jnp.argmax(tone_logits, axis=-1)
    acc = _mean(jnp.sum((pred == tones) * w), count)
    return {"loss": _mean(total, count), "count": count, "accuracy": acc}


def turn_loss(
    turn_logits: jax.Array, turn_targets: jax.Array, turn_weight: jax.Array | None = None
) -> dict[str, jax.Array]:
    """輪替頭損失：`turn_logits [..., N, 5]`、`turn_targets [..., N]`（TurnAction，-1 忽略）、
    `turn_weight [..., N]`。loss = Σ w·CE / Σ w；另回傳加權 accuracy 與 weight_sum。"""
    total, wsum = masked_cross_entropy(turn_logits, turn_targets, turn_weight)
    tgt = jnp.asarray(turn_targets)
    w = (tgt != IGNORE_ID).astype(jnp.float32)
    if turn_weight is not None:
        w = w * jnp.asarray(turn_weight, jnp.float32)
    acc = _mean(jnp.sum((jnp.argmax(turn_logits, -1) == tgt) * w), wsum)
    return {"loss": _mean(total, wsum), "weight_sum": wsum, "accuracy": acc}
