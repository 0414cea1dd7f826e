"""重疊感知逐幀目標（手算）、JAX 損失（以均勻 logits 的 log V 等手算值驗證）與聲調正確率。"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speakllm_jax.eval.tone_accuracy import (
    tone_accuracy_from_predictions,
    tone_accuracy_text,
    tone_confusion,
)
from speakllm_jax.training.losses import (
    OverlapConfig,
    TurnAction,
    dual_scale_loss,
    masked_cross_entropy,
    overlap_aware_targets,
    tone_aux_loss,
    turn_loss,
)

L, S, C, Y, B = (int(a) for a in TurnAction)  # 0 1 2 3 4

TURNS = [
    {"speaker": "user", "start": 0.0, "end": 0.36, "text": "你好", "kind": "utterance"},
    {"speaker": "assistant", "start": 0.4, "end": 0.8, "text": "您好", "kind": "utterance"},
    {"speaker": "user", "start": 0.52, "end": 0.6, "text": "嗯", "kind": "backchannel"},
    {"speaker": "assistant", "start": 0.96, "end": 1.4, "text": "好的", "kind": "interrupted"},
    {"speaker": "user", "start": 1.12, "end": 1.5, "text": "等一下", "kind": "utterance"},
]
BC = {"start": 0.52, "end": 0.6, "kind": "backchannel", "by": "user", "onset": 0.52}
BARGE = {"start": 1.12, "end": 1.24, "kind": "barge_in", "by": "user", "onset": 1.12}


def _expected(pairs: list[tuple[int, int]], n: int) -> list[int]:
    out = []
    for value, count in pairs:
        out += [value] * count
    assert len(out) == n
    return out


def test_overlap_targets_by_hand():
    cfg = OverlapConfig(reaction_frames=3, barge_in_weight=2.0, backchannel_weight=1.5)
    ft = overlap_aware_targets(TURNS, [BC, BARGE], 40, cfg)
    # 助理段 1：[0.4, 0.8) → 幀 [10, 20)：10 SPEAK，11..19 CONTINUE（附和 [13, 15) 不改變）
    # 助理段 2：[0.96, 1.4) → 幀 [24, 35)：24 SPEAK，25..27 CONTINUE；
    # 搶話起點 1.12 → 幀 28：28..30 YIELD（R = 3），31..34 LISTEN；其餘 LISTEN
    assert ft.turn_targets.tolist() == _expected(
        [(L, 10), (S, 1), (C, 9), (L, 4), (S, 1), (C, 3), (Y, 3), (L, 4), (L, 5)], 40
    )
    # 語音權重：只有 [28 + 3, 35) = 31..34 為 0
    assert ft.speech_weight.tolist() == _expected([(1, 31), (0, 4), (1, 5)], 40)
    # 輪替權重：附和重疊 [13, 15) 為 1.5；搶話 [28, 31) 與重疊 [28, 31) 為 2
    assert ft.turn_weight.tolist() == _expected([(1, 13), (1.5, 2), (1, 13), (2, 3), (1, 9)], 40)
    assert ft.barge_in_frames.tolist() == [28]


def test_backchannel_changes_nothing_for_the_speaker_and_ablation_is_plain():
    cfg = OverlapConfig(reaction_frames=3)
    with_bc = overlap_aware_targets(TURNS, [BC], 40, cfg)
    without = overlap_aware_targets(TURNS, [], 40, cfg)
    assert (with_bc.turn_targets == without.turn_targets).all()
    assert (with_bc.speech_weight == without.speech_weight).all()
    assert (with_bc.turn_targets[13:15] == C).all()
    plain = overlap_aware_targets(TURNS, [BC, BARGE], 40, OverlapConfig(ablation=True))
    # 消融：兩個助理段都是 SPEAK + CONTINUE 到段尾（不管搶話），權重全 1
    assert plain.turn_targets.tolist() == _expected(
        [(L, 10), (S, 1), (C, 9), (L, 4), (S, 1), (C, 10), (L, 5)], 40
    )
    assert (plain.speech_weight == 1).all() and (plain.turn_weight == 1).all()
    # 無重疊的對話：模組開與關的輸出相同
    on = overlap_aware_targets(TURNS, [], 40)
    assert (on.turn_targets == plain.turn_targets).all()


def test_barge_in_outside_assistant_speech_and_assistant_backchannel():
    turns = TURNS[:2] + [
        {"speaker": "assistant", "start": 1.2, "end": 1.32, "text": "嗯", "kind": "backchannel"}
    ]
    ft = overlap_aware_targets(
        turns, [{"start": 0.2, "end": 0.3, "kind": "barge_in", "by": "user", "onset": 0.2}], 40
    )
    assert ft.barge_in_frames.size == 0 and (ft.speech_weight == 1).all()
    # 助理附和 [1.2, 1.32) → 幀 [30, 33) 為 BACKCHANNEL
    assert ft.turn_targets[30:33].tolist() == [B, B, B] and ft.turn_targets[33] == L
    with pytest.raises(ValueError, match="kind"):
        overlap_aware_targets(TURNS, [{"start": 0, "end": 1, "kind": "laugh"}], 40)
    with pytest.raises(ValueError, match="turns\\[0\\]"):
        overlap_aware_targets([{"speaker": "user", "start": 0}], [], 40)


def test_masked_cross_entropy_uniform_logits():
    V = 8
    logits = jnp.zeros((4, V))
    targets = jnp.array([1, 5, 2, -1])
    weights = jnp.array([1.0, 2.0, 0.0, 1.0])
    total, wsum = masked_cross_entropy(logits, targets, weights)
    # 均勻 logits：每個位置 CE = log 8；權重 1 + 2 + 0（第四個是忽略目標）= 3
    assert float(wsum) == 3.0
    assert float(total) == pytest.approx(3 * math.log(8), rel=1e-6)
    # 非均勻：與 NumPy 的 log-softmax 對照
    rng = np.random.default_rng(0)
    lg = rng.normal(size=(2, 3, V)).astype(np.float32)
    tg = rng.integers(0, V, size=(2, 3))
    lsm = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    ref = -np.take_along_axis(lsm, tg[..., None], -1)[..., 0].sum()
    total, wsum = jax.jit(masked_cross_entropy)(lg, tg, None)
    assert float(total) == pytest.approx(float(ref), rel=1e-5) and float(wsum) == 6.0


def test_dual_scale_loss_and_weights():
    N, V = 5, 10
    text_logits = jnp.zeros((N, V))
    text_targets = jnp.array([3, 0, 0, 7, 0])
    text_mask = jnp.array([1, 0, 0, 1, 0])
    code_logits = np.zeros((N, 4, 2048), np.float32)
    code_logits[4, :, 0] = 50.0  # 第 5 幀預測錯得離譜，但權重為 0，不影響
    code_targets = jnp.full((N, 4), 7)
    code_weight = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    out = jax.jit(dual_scale_loss, static_argnames=())(
        text_logits, text_targets, text_mask, code_logits, code_targets, code_weight, 0.5, 2.0
    )
    assert float(out["text_loss"]) == pytest.approx(math.log(10), rel=1e-6)
    assert float(out["code_loss"]) == pytest.approx(math.log(2048), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(0.5 * math.log(10) + 2 * math.log(2048), rel=1e-6)
    assert float(out["text_count"]) == 2 and float(out["code_count"]) == 12
    assert np.allclose(np.asarray(out["code_loss_per_codebook"]), math.log(2048), rtol=1e-6)
    # 碼本權重：只算語義碼本（第一個）時 code_count = 3
    sem = dual_scale_loss(
        text_logits,
        text_targets,
        text_mask,
        code_logits,
        code_targets,
        code_weight,
        codebook_weights=(1.0, 0.0, 0.0, 0.0),
    )
    assert float(sem["code_count"]) == 3
    # 梯度有限
    g = jax.grad(
        lambda x: dual_scale_loss(
            text_logits, text_targets, text_mask, x, code_targets, code_weight
        )["loss"]
    )(jnp.asarray(code_logits))
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g[3:]).sum()) == 0.0


def test_tone_aux_loss_ignores_toneless_positions():
    tones = jnp.array([[2, 0], [0, 0], [5, 3]])  # [n=3, K=2]
    logits = np.zeros((3, 2, 6), np.float32)
    logits[0, 0, 2] = 10.0  # 正確
    logits[2, 0, 1] = 10.0  # 錯（參考為 5）
    logits[1, :, 4] = 99.0  # 無聲調位置：不論 logits 為何都不計
    out = tone_aux_loss(logits, tones)
    assert float(out["count"]) == 3
    # 位置 (2, 1) 的 logits 均勻 → CE = log 6；兩個 10 分的位置用 log-softmax 手算
    ce_right = -(10 - math.log(math.exp(10) + 5))
    ce_wrong = -(0 - math.log(math.exp(10) + 5))
    assert float(out["loss"]) == pytest.approx((ce_right + ce_wrong + math.log(6)) / 3, rel=1e-5)
    # 正確率：(0,0) 對、(2,0) 錯、(2,1) 均勻 argmax = 0 ≠ 3 錯 → 1/3
    assert float(out["accuracy"]) == pytest.approx(1 / 3)
    masked = tone_aux_loss(logits, tones, weights=jnp.array([1.0, 1.0, 0.0]))
    assert float(masked["count"]) == 1 and float(masked["accuracy"]) == 1.0


def test_turn_loss_weighted():
    logits = np.zeros((3, 5), np.float32)
    logits[0, Y] = 20.0  # 近乎 0 的 CE
    targets = jnp.array([Y, C, -1])
    weights = jnp.array([2.0, 1.0, 5.0])
    out = turn_loss(logits, targets, weights)
    ce0 = -(20 - math.log(math.exp(20) + 4))
    # Σ w·CE / Σ w = (2·ce0 + 1·log 5) / 3（第三個目標忽略）
    assert float(out["loss"]) == pytest.approx((2 * ce0 + math.log(5)) / 3, rel=1e-5)
    assert float(out["weight_sum"]) == 3.0
    assert float(out["accuracy"]) == pytest.approx(2 / 3)


def test_tone_accuracy_text_and_predictions():
    # 银行 yín háng（2 2）、很 hěn（3）、大 dà（4）；杏 xìng（4）
    res = tone_accuracy_text(["银行很大", "银行很大"], ["银杏很大", "银很大"])
    conf = np.array(res["confusion"])
    # 第一句：行(2)→杏(4) 錯，其餘三字對；第二句：行被刪（欄 0），其餘三字對
    assert res["total"] == 8 and res["correct"] == 6 and res["accuracy"] == pytest.approx(0.75)
    assert conf[2, 4] == 1 and conf[2, 0] == 1 and conf[2, 2] == 2 and conf[3, 3] == 2
    assert res["per_tone_accuracy"]["2"] == pytest.approx(0.5)
    assert res["per_tone_accuracy"]["4"] == 1.0 and res["per_tone_accuracy"]["1"] is None
    # 英文與標點不計分
    assert tone_accuracy_text("我用 Zoom 開會。", "我用 zoom 開會")["accuracy"] == 1.0
    # 聲調頭的逐字預測：「他在行走」參考 1 4 2 3（行 xíng 依詞語判定）
    res2 = tone_accuracy_from_predictions(["他在行走"], [[1, 4, 4, 3]])
    assert res2["accuracy"] == pytest.approx(0.75) and res2["confusion"][2][4] == 1
    with pytest.raises(ValueError, match="漢字"):
        tone_accuracy_from_predictions(["他在行走"], [[1, 4]])
    assert tone_confusion([0, 1], [3, 1]).sum() == 1
