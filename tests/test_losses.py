"""重疊感知逐幀目標（手算）、訓練所用的各損失項（以均勻 logits 的 log V 等手算值驗證）、
一批真實資料的訓練損失等於文件中的加權總和，以及聲調正確率。"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speakllm_jax.data.demo_corpus import has_espeak
from speakllm_jax.data.overlap import OverlapConfig, overlap_aware_targets
from speakllm_jax.eval.tone_accuracy import (
    tone_accuracy_from_predictions,
    tone_accuracy_text,
    tone_confusion,
)
from speakllm_jax.labels import EMOTIONS, NUM_EMOTIONS, TurnAction
from speakllm_jax.training.losses import (
    LossWeights,
    duplex_loss,
    emotion_loss,
    frame_text_loss,
    masked_cross_entropy,
    speech_code_loss,
    text_loss,
    tone_aux_loss,
    turn_loss,
    weighted_correct,
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


def _np_ce(logits, targets):
    """NumPy 的逐位置交叉熵（float64），作為 JAX 損失的獨立參考。"""
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    t = np.where(np.asarray(targets) < 0, 0, np.asarray(targets))
    return lse - np.take_along_axis(lg, t[..., None], -1)[..., 0]


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
    total, wsum = jax.jit(masked_cross_entropy)(lg, tg, None)
    assert float(total) == pytest.approx(float(_np_ce(lg, tg).sum()), rel=1e-5)
    assert float(wsum) == 6.0


def test_text_loss_and_token_accuracy():
    logits = np.zeros((1, 3, 5), np.float32)
    logits[0, 0, 2] = 30.0  # 對
    logits[0, 1, 4] = 30.0  # 錯（目標 1）
    targets = jnp.array([[2, 1, 3]])
    mask = jnp.array([[1, 1, 0]])
    total, count = text_loss(logits, targets, mask)
    assert float(count) == 2.0
    assert float(total) == pytest.approx(float(_np_ce(logits, targets)[0, :2].sum()), rel=1e-5)
    assert float(weighted_correct(logits, targets, mask)) == 1.0


def test_frame_text_loss_weights_pad_frames():
    # 4 幀：文字幀 0、2；無文字幀 1；填充到固定長度的幀 3（frame_mask = 0）
    V, pad_w = 10, 0.5
    total, weight = frame_text_loss(
        jnp.zeros((1, 4, V)),
        jnp.array([[3, 9, 7, 9]]),
        jnp.array([[1, 0, 1, 0]]),
        jnp.array([[1, 1, 1, 0]]),
        pad_weight=pad_w,
    )
    assert float(weight) == pytest.approx(2 + pad_w)
    assert float(total) == pytest.approx((2 + pad_w) * math.log(V), rel=1e-6)


def test_speech_code_loss_frame_and_codebook_weights():
    N, Q, K = 5, 4, 2048
    code_logits = np.zeros((1, N, Q, K), np.float32)
    code_logits[0, 4, :, 0] = 50.0  # 第 5 幀預測錯得離譜，但權重為 0，不影響
    code_targets = jnp.full((1, N, Q), 7)
    code_weight = jnp.array([[1.0, 1.0, 1.0, 0.0, 0.0]])  # 搶話後的幀 speech_weight = 0
    frame = jnp.array([[1, 1, 0, 1, 1]])  # 第 3 幀是補齊的
    total, weight = jax.jit(speech_code_loss)(code_logits, code_targets, code_weight, frame)
    assert float(weight) == 2 * Q
    assert float(total) == pytest.approx(2 * Q * math.log(K), rel=1e-6)
    # 碼本權重：只算語義碼本（第一個）
    sem = speech_code_loss(code_logits, code_targets, code_weight, frame, (1.0, 0.0, 0.0, 0.0))
    assert float(sem[1]) == 2
    with pytest.raises(ValueError, match="codebook_weights"):
        speech_code_loss(code_logits, code_targets, code_weight, frame, (1.0, 1.0))
    # 梯度只流到有權重的幀
    g = jax.grad(lambda x: speech_code_loss(x, code_targets, code_weight, frame)[0])(
        jnp.asarray(code_logits)
    )
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g[:, 2:]).sum()) == 0.0


def test_tone_aux_loss_ignores_toneless_positions():
    tones = jnp.array([[2, 0], [0, 0], [5, 3]])  # [n=3, K=2]
    logits = np.zeros((3, 2, 6), np.float32)
    logits[0, 0, 2] = 10.0  # 正確
    logits[2, 0, 1] = 10.0  # 錯（參考為 5）
    logits[1, :, 4] = 99.0  # 無聲調位置：不論 logits 為何都不計
    total, count = tone_aux_loss(logits, tones)
    assert float(count) == 3
    # 位置 (2, 1) 的 logits 均勻 → CE = log 6；兩個 10 分的位置用 log-softmax 手算
    ce_right = -(10 - math.log(math.exp(10) + 5))
    ce_wrong = -(0 - math.log(math.exp(10) + 5))
    assert float(total) == pytest.approx(ce_right + ce_wrong + math.log(6), rel=1e-5)
    # 符號權重：第三個符號不計 → 只剩 (0, 0)
    total, count = tone_aux_loss(logits, tones, jnp.array([1.0, 1.0, 0.0]))
    assert float(count) == 1 and float(total) == pytest.approx(ce_right, abs=1e-6)


def test_turn_loss_weighted():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, 0, Y] = 20.0  # 近乎 0 的 CE
    targets = jnp.array([[Y, C, -1, L]])
    weights = jnp.array([[2.0, 1.0, 5.0, 3.0]])
    frame = jnp.array([[1, 1, 1, 0]])
    total, wsum = turn_loss(logits, targets, weights, frame)
    ce0 = -(20 - math.log(math.exp(20) + 4))
    # Σ v·CE = 2·ce0 + 1·log 5（第三個目標忽略、第四幀是補齊的）
    assert float(total) == pytest.approx(2 * ce0 + math.log(5), rel=1e-5)
    assert float(wsum) == 3.0
    # 類別權重 c_y：SPEAK ×8、YIELD ×4（輪替配方的設定），v_t 再乘上目標類別的權重。
    cw = (1.0, 8.0, 1.0, 4.0, 1.0)
    total, wsum = turn_loss(logits, targets, weights, frame, class_weights=cw)
    assert float(total) == pytest.approx(4 * 2 * ce0 + 1 * math.log(5), rel=1e-5)
    assert float(wsum) == 4 * 2 + 1
    with pytest.raises(ValueError, match="class_weights"):
        turn_loss(logits, targets, weights, frame, class_weights=(1.0, 2.0))
    lw = LossWeights.from_config(dict(LossWeights().__dict__, turn_classes=[1, 8, 1, 4, 1]))
    assert lw.turn_classes == cw
    assert (
        LossWeights.from_config(
            {k: 1.0 for k in ("text", "code", "turn", "tone", "emotion", "pad_weight")}
        ).turn_classes
        == ()
    )


def test_emotion_loss_weights_by_valid_frames():
    logits = jnp.zeros((2, NUM_EMOTIONS))
    frame = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    total, weight = emotion_loss(logits, jnp.array([1, 4]), frame)
    assert float(weight) == 4.0
    assert float(total) == pytest.approx(4 * math.log(NUM_EMOTIONS), rel=1e-6)


def test_duplex_loss_is_weighted_sum_over_frames():
    rng = np.random.default_rng(1)
    B, N, V, Q, K, T = 2, 6, 11, 2, 8, 3
    out = {
        "text": rng.normal(size=(B, N, V)).astype(np.float32),
        "codes": rng.normal(size=(B, N, Q, K)).astype(np.float32),
        "turn": rng.normal(size=(B, N, 5)).astype(np.float32),
        "tones": rng.normal(size=(B, N, T, 6)).astype(np.float32),
        "emotion": rng.normal(size=(B, NUM_EMOTIONS)).astype(np.float32),
    }
    batch = _random_batch(rng, B, N, V, Q, K, T)
    w = LossWeights(text=1.0, code=0.7, turn=1.3, tone=0.2, emotion=0.5, pad_weight=0.25)
    total, weight, metrics = duplex_loss(out, batch, w)
    ref = _reference_terms(out, batch, w.pad_weight)
    assert float(weight) == batch["frame_mask"].sum()
    assert sorted(metrics) == sorted(f"{k}_loss" for k in ref)
    for k, v in ref.items():
        assert float(metrics[f"{k}_loss"]) == pytest.approx(v, rel=1e-5), k
    expect = sum(getattr(w, k) * v for k, v in ref.items())
    assert float(total) == pytest.approx(expect, rel=1e-5)
    # 沒有情緒頭：沒有情緒項
    no_emo = {k: v for k, v in out.items() if k != "emotion"}
    assert "emotion_loss" not in duplex_loss(no_emo, batch, w)[2]


def _random_batch(rng, B, N, V, Q, K, T):
    frame = np.zeros((B, N), bool)
    frame[0, :] = True
    frame[1, : N - 2] = True
    return {
        "frame_mask": frame,
        "text_target": rng.integers(0, V, (B, N)).astype(np.int32),
        "text_is_token": rng.random((B, N)) < 0.5,
        "tones_target": rng.integers(0, 6, (B, N, T)).astype(np.int32),
        "codes_target": rng.integers(0, K, (B, N, Q)).astype(np.int32),
        "code_weight": (rng.random((B, N)) < 0.7).astype(np.float32),
        "turn_target": rng.integers(0, 5, (B, N)).astype(np.int32),
        "turn_weight": rng.choice([1.0, 1.5, 2.0], (B, N)).astype(np.float32),
        "emotion": rng.integers(0, NUM_EMOTIONS, (B,)).astype(np.int32),
    }


def _reference_terms(out, batch, pad_weight):
    """`docs/research_modules.md` 的各項總和 S_k（NumPy，與 `losses.py` 無共用程式碼）。"""
    f = np.asarray(batch["frame_mask"], np.float64)
    tok = np.asarray(batch["text_is_token"], np.float64)
    tones = np.asarray(batch["tones_target"])
    ref = {
        "text": (_np_ce(out["text"], batch["text_target"]) * (tok + (1 - tok) * pad_weight) * f),
        "code": _np_ce(out["codes"], batch["codes_target"])
        * (np.asarray(batch["code_weight"]) * f)[..., None],
        "turn": _np_ce(out["turn"], batch["turn_target"]) * np.asarray(batch["turn_weight"]) * f,
        "tone": _np_ce(out["tones"], tones) * (tones > 0) * (tok * f)[..., None],
    }
    ref = {k: float(v.sum()) for k, v in ref.items()}
    if "emotion" in out:
        ref["emotion"] = float((_np_ce(out["emotion"], batch["emotion"]) * f.sum(1)).sum())
    return ref


def _shift(x, fill):
    """第 t 幀的輸入是第 t-1 幀的輸出（文件中的右移一格）。"""
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


@pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
def test_training_loss_equals_documented_weighted_sum(crop_dialogues, qwen_tokenizer_dir):
    """第 3 階段（含情緒頭）的一批真實對話：訓練步記錄的損失 = Σ λ_k S_k / Σ frame_mask。

    走訓練真正的路徑（`DuplexTask.row_ops` → `DuplexTask.loss` → `make_train_step`，梯度累積 2 步），
    參考值由模型輸出依文件公式以 NumPy 計算；改一個權重（`loss.tone`），訓練損失跟著變。
    只訓練輪替頭，讓反向傳播（與編譯）保持便宜；損失本身與可訓練參數的選擇無關。
    """
    import optax
    from flax import nnx

    from configs.phase3_emotion import get_config
    from speakllm_jax.training.tasks.duplex import DuplexTask
    from speakllm_jax.training.train_state import make_train_step, state_from_model

    rows = [dict(r) for r in crop_dialogues[:2]]
    assert all(any(o["kind"] == "barge_in" for o in r["overlaps"]) for r in rows)
    rows[1]["emotion"] = EMOTIONS[2]
    cfg = get_config("tiny")
    cfg.model.tokenizer_path = str(qwen_tokenizer_dir)
    cfg.data.max_frames = 232
    cfg.train.batch_size = 2
    cfg.trainable = ("turn_head/.*",)

    changed = cfg.copy_and_resolve_references()
    changed.loss.tone = float(cfg.loss.tone) + 1.0
    task, task2 = DuplexTask(cfg), DuplexTask(changed)
    q = task.model_cfg.speech.num_codebooks
    rng = np.random.default_rng(0)
    codes = {
        r["id"]: rng.integers(0, 2048, (q, math.ceil(r["duration"] / 0.04))).astype(np.int16)
        for r in rows
    }
    tf = task.row_ops(codes)
    items = [tf(r) for r in rows]
    assert all(x is not None for x in items)
    batch = {k: np.stack([x[k] for x in items]) for k in items[0]}
    tx = optax.sgd(0.0)
    model = task.build_model(nnx.Rngs(0))
    state = state_from_model(model, cfg.trainable, tx, 0)
    graphdef = nnx.graphdef(model)
    sched = optax.constant_schedule(0.0)
    step = make_train_step(task, graphdef, tx, sched, 2)
    step2 = make_train_step(task2, graphdef, tx, sched, 2)

    @jax.jit
    def run(st, b):
        # 兩個設定的訓練步與參考用的前向放在同一次編譯（相同的子圖由 XLA 合併）。
        m = nnx.merge(graphdef, st.params, st.frozen)
        out = m.duplex_forward(
            b["mel"],
            b["mel_mask"],
            _shift(b["text_target"], task.pad_id),
            _shift(b["tones_target"], 0),
            _shift(b["codes_target"], 0),
            _shift(b["code_weight"] > 0, False),
            b["codes_target"],
            b["frame_mask"],
            cond_ids=b["emotion_token"],
        )
        return step(st, b)[1], step2(st, b)[1], out

    metrics, metrics2, out = jax.tree.map(np.asarray, run(state, batch))
    ref = _reference_terms(out, batch, float(cfg.loss.pad_weight))
    assert set(ref) == {"text", "code", "turn", "tone", "emotion"}
    assert all(v > 0 for v in ref.values()), ref
    assert (batch["turn_weight"] > 1).any() and (batch["code_weight"] == 0).any()
    frames = float(batch["frame_mask"].sum())
    expect = sum(float(cfg.loss[k]) * v for k, v in ref.items()) / frames
    assert float(metrics["weight"]) == frames
    assert float(metrics["loss"]) == pytest.approx(expect, rel=1e-4)
    for k, v in ref.items():
        assert float(metrics[f"{k}_loss"]) == pytest.approx(v / frames, rel=1e-4), k

    assert float(metrics2["loss"]) == pytest.approx(expect + ref["tone"] / frames, rel=1e-4)
    assert float(metrics2["loss"]) > float(metrics["loss"])


def test_emotion_labels_are_defined_once():
    from configs.phase3_emotion import get_config
    from speakllm_jax.data.demo_corpus import DEMO_EMOTIONS, EMOTION_STYLES
    from speakllm_jax.text.tokenizer import SPECIAL_TOKENS

    assert get_config("tiny").model.num_emotions == len(EMOTIONS)
    assert tuple(EMOTION_STYLES) == tuple(DEMO_EMOTIONS) == EMOTIONS
    emo = [t for t in SPECIAL_TOKENS if t.startswith("<|emo_")]
    assert emo == [f"<|emo_{e}|>" for e in EMOTIONS]


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
