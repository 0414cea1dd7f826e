"""訓練真正使用的損失項：每一項都是具名函式，回傳 (加權損失總和, 權重總和)。

回傳「總和」而不是平均，訓練引擎（`train_state.make_train_step`）才能在梯度累積的微批次與多主機
之間先加總、最後只除一次，切分方式不同時結果仍一致。目標為 -1（`IGNORE_ID`）的位置權重自動為 0；
log-softmax 一律以 float32 計算。

- 第 0 階段（`asr_connector`）：`text_loss`，以有效文字符號數正規化。
- 第 1–3 階段（`duplex`）：`duplex_loss` 組合 `frame_text_loss`（Dual-Scale 的語義尺度）、
  `speech_code_loss`（聲學尺度；權重含 Overlap-Aware 的 speech_weight）、`turn_loss`
  （權重為 Overlap-Aware 的 turn_weight）、`tone_aux_loss`（Tone-Aware）與 `emotion_loss`，
  各乘上 `config.loss` 的權重後相加，整批以有效幀數 Σ frame_mask 正規化。
  Overlap-Aware 的逐幀目標與權重由資料端的 `speakllm_jax.data.overlap` 產生。
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import jax
import jax.numpy as jnp

from speakllm_jax.labels import IGNORE_ID

# 一個損失項：(Σ w·CE, Σ w)。
LossTerm = tuple[jax.Array, jax.Array]


def _weights(targets: jax.Array, weights: jax.Array | None) -> jax.Array:
    """有效位置（目標不是 IGNORE_ID）的權重，`weights` 可廣播到 targets，缺省為 1。"""
    valid = (targets != IGNORE_ID).astype(jnp.float32)
    if weights is None:
        return valid
    return valid * jnp.broadcast_to(jnp.asarray(weights, jnp.float32), targets.shape)


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> LossTerm:
    """加權交叉熵：回傳 (Σ w·CE, Σ w)。

    `logits [..., V]`、`targets [...]`（整數；-1 表示忽略）、`weights [...]`（可廣播到 targets，
    缺省為 1）。所有損失項都由它計算。
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    targets = jnp.asarray(targets)
    w = _weights(targets, weights)
    safe = jnp.where(targets == IGNORE_ID, 0, targets).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w), jnp.sum(w)


def weighted_correct(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Σ w·[argmax = 目標]（權重規則同 `masked_cross_entropy`）；除以同一權重即為正確率。"""
    targets = jnp.asarray(targets)
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(hit * _weights(targets, weights))


def text_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> LossTerm:
    """文字交叉熵（第 0 階段 ASR）：`logits [B, T, V]`、`targets [B, T]`、`mask [B, T]`。

    回傳 (Σ mask·CE, Σ mask)，即以有效文字符號數正規化。
    """
    return masked_cross_entropy(logits, targets, mask)


def frame_text_loss(
    text_logits: jax.Array,
    text_targets: jax.Array,
    text_is_token: jax.Array,
    frame_mask: jax.Array,
    pad_weight: float,
) -> LossTerm:
    """Dual-Scale 的語義尺度：幀上的文字計畫。`text_logits [B, N, V]`、其餘 `[B, N]`。

    幀權重 w_t = (文字幀 ? 1 : pad_weight) · frame_t；無文字幀的目標是填充符號。
    """
    is_tok = jnp.asarray(text_is_token, jnp.float32)
    frame = jnp.asarray(frame_mask, jnp.float32)
    w = (is_tok + (1.0 - is_tok) * float(pad_weight)) * frame
    return masked_cross_entropy(text_logits, text_targets, w)


def speech_code_loss(
    code_logits: jax.Array,
    code_targets: jax.Array,
    code_weight: jax.Array,
    frame_mask: jax.Array,
    codebook_weights: Sequence[float] | None = None,
) -> LossTerm:
    """Dual-Scale 的聲學尺度：每幀的語音碼。`code_logits [B, N, Q, K]`、`code_targets [B, N, Q]`、
    `code_weight [B, N]`（= Overlap-Aware 的 speech_weight · 有碼）、`frame_mask [B, N]`。

    權重 w_{t,q} = code_weight_t · frame_t · β_q；`codebook_weights β [Q]` 缺省全為 1（訓練用缺省）。
    """
    code_targets = jnp.asarray(code_targets)
    w = (jnp.asarray(code_weight, jnp.float32) * jnp.asarray(frame_mask, jnp.float32))[..., None]
    if codebook_weights is not None:
        cb = jnp.asarray(codebook_weights, jnp.float32)
        if cb.shape != (code_targets.shape[-1],):
            raise ValueError(f"codebook_weights 長度應為 {code_targets.shape[-1]}，得到 {cb.shape}")
        w = w * cb
    return masked_cross_entropy(code_logits, code_targets, w)


def tone_aux_loss(
    tone_logits: jax.Array, tones: jax.Array, token_weight: jax.Array | None = None
) -> LossTerm:
    """Tone-Aware 的聲調輔助損失：`tone_logits [..., K, 6]`、`tones [..., K]`（0 = 無聲調，不計；
    1–4 四聲、5 輕聲，與 `speakllm_jax.text.tones` 相同）、`token_weight [...]`（訓練用
    文字幀遮罩 · frame_mask）。

    權重 w_{t,k} = [τ_{t,k} > 0] · token_weight_t。
    """
    tones = jnp.asarray(tones)
    w = (tones > 0).astype(jnp.float32)
    if token_weight is not None:
        w = w * jnp.asarray(token_weight, jnp.float32)[..., None]
    return masked_cross_entropy(tone_logits, jnp.where(tones > 0, tones, IGNORE_ID), w)


def turn_loss(
    turn_logits: jax.Array,
    turn_targets: jax.Array,
    turn_weight: jax.Array | None = None,
    frame_mask: jax.Array | None = None,
    class_weights: Sequence[float] | None = None,
) -> LossTerm:
    """輪替頭損失：`turn_logits [..., N, 5]`、`turn_targets [..., N]`（TurnAction，-1 忽略）、
    `turn_weight [..., N]`（Overlap-Aware 的輪替權重）、`class_weights [5]`（各類別的權重 c_y，
    缺省全為 1；SPEAK 每輪只有一幀，類別權重抵銷它的稀少）。權重 v_t = turn_weight_t · frame_t · c_{y_t}。"""
    w = None if turn_weight is None else jnp.asarray(turn_weight, jnp.float32)
    if frame_mask is not None:
        f = jnp.asarray(frame_mask, jnp.float32)
        w = f if w is None else w * f
    if class_weights is not None and len(class_weights):
        cw = jnp.asarray(class_weights, jnp.float32)
        if cw.shape != (turn_logits.shape[-1],):
            raise ValueError(f"class_weights 長度應為 {turn_logits.shape[-1]}，得到 {cw.shape}")
        safe = jnp.where(turn_targets == IGNORE_ID, 0, turn_targets).astype(jnp.int32)
        c = cw[safe]
        w = c if w is None else w * c
    return masked_cross_entropy(turn_logits, turn_targets, w)


def emotion_loss(emotion_logits: jax.Array, emotion: jax.Array, frame_mask: jax.Array) -> LossTerm:
    """情緒頭損失：`emotion_logits [B, E]`、`emotion [B]`、`frame_mask [B, N]`。

    每段一個標籤，以該段的有效幀數 M_b 加權，與逐幀的各項同尺度。
    """
    m = jnp.sum(jnp.asarray(frame_mask, jnp.float32), axis=1)
    return masked_cross_entropy(emotion_logits, emotion, m)


@dataclass(frozen=True)
class LossWeights:
    """全雙工損失各項的權重（`config.loss`）；`pad_weight` 為無文字幀預測填充符號的權重；
    `turn_classes` 為輪替頭各類別（`TurnAction` 順序）的權重，空的表示全為 1。"""

    text: float = 1.0
    code: float = 1.0
    turn: float = 1.0
    tone: float = 0.2
    emotion: float = 0.5
    pad_weight: float = 0.5
    turn_classes: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, loss: Any) -> LossWeights:
        """由 `config.loss` 建立；純量欄位都必須在設定中，`turn_classes` 可省略。"""
        kw: dict[str, Any] = {
            f.name: float(loss[f.name]) for f in fields(cls) if f.name != "turn_classes"
        }
        kw["turn_classes"] = tuple(float(x) for x in (loss.get("turn_classes") or ()))
        return cls(**kw)


def duplex_loss_terms(
    out: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    pad_weight: float,
    turn_classes: Sequence[float] | None = None,
) -> dict[str, LossTerm]:
    """全雙工的各損失項。`out` 為 `SpeakLLM.duplex_forward` 的輸出，`batch` 為任務的批次。

    回傳 `{text, code, turn, tone[, emotion]}`，每項為 (加權總和, 權重總和)；模型沒有情緒頭時無 emotion。
    """
    frame = batch["frame_mask"].astype(jnp.float32)
    is_tok = batch["text_is_token"].astype(jnp.float32)
    terms = {
        "text": frame_text_loss(
            out["text"], batch["text_target"], is_tok, frame, pad_weight=pad_weight
        ),
        "code": speech_code_loss(out["codes"], batch["codes_target"], batch["code_weight"], frame),
        "turn": turn_loss(
            out["turn"], batch["turn_target"], batch["turn_weight"], frame, turn_classes
        ),
        "tone": tone_aux_loss(out["tones"], batch["tones_target"], is_tok * frame),
    }
    if "emotion" in out:
        terms["emotion"] = emotion_loss(out["emotion"], batch["emotion"], frame)
    return terms


def duplex_loss(
    out: dict[str, jax.Array], batch: dict[str, jax.Array], weights: LossWeights
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """全雙工訓練損失：回傳 (Σ_k λ_k·S_k, Σ frame_mask, 指標)。

    S_k 為第 k 項的加權總和、λ_k 為 `weights` 中的權重；引擎把總和除以整個全域批次的有效幀數，
    記錄的 `<k>_loss` 指標同樣是 S_k / Σ frame_mask。
    """
    terms = duplex_loss_terms(out, batch, weights.pad_weight, weights.turn_classes)
    total = sum(getattr(weights, k) * s for k, (s, _) in terms.items())
    metrics = {f"{k}_loss": s for k, (s, _) in terms.items()}
    return total, jnp.sum(batch["frame_mask"].astype(jnp.float32)), metrics
