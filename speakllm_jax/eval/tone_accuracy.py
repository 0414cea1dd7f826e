"""聲調正確率：只看漢字，參考聲調由 pypinyin 依整句判定（`speakllm_jax.text.tones.char_tones`）。

聲調編號與 `speakllm_jax.text.tones` 相同：1–4 為四聲、5 為輕聲、0 表示無聲調。
混淆矩陣 `confusion [6, 6]`：列為參考聲調、欄為預測聲調；欄 0 表示「沒有預測」
（辨識結果漏掉該字，或預測為非漢字／無聲調）。列 0 永遠為 0（非漢字不計分）。

兩種用法：
- `tone_accuracy_from_predictions(texts, predicted)`：模型的聲調頭對每個參考漢字給出聲調
  （`predicted[i]` 長度等於第 i 句的漢字數）。
- `tone_accuracy_text(references, hypotheses)`：辨識（或合成後再辨識）出的文字；以 jiwer
  對漢字序列做 Levenshtein 對齊，相同或替換的漢字比較兩邊在各自句中的聲調（所以
  「行」在不同詞裡的讀音會被正確區分），刪除的參考漢字記為欄 0（錯誤），插入不計。
- `tone_head_summary(targets, predicted)`：聲調頭在幀格上的逐位置預測對上目標
  （全雙工評估的教師強制正確率，見 `eval.evaluate.tone_head_accuracy`）。
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jiwer
import numpy as np

from speakllm_jax.labels import NUM_TONES
from speakllm_jax.text.codeswitch import is_han
from speakllm_jax.text.tones import char_tones


def han_tones(text: str) -> tuple[list[str], list[int]]:
    """句中的漢字與其聲調（詞語感知）。"""
    tones = char_tones(text)
    chars, out = [], []
    for ch, t in zip(text, tones):
        if is_han(ch):
            chars.append(ch)
            out.append(int(t))
    return chars, out


def _summary(conf: np.ndarray) -> dict[str, Any]:
    total = int(conf[1:].sum())
    correct = int(np.trace(conf[1:, 1:]) + 0)
    per_tone = {}
    for t in range(1, NUM_TONES):
        row = int(conf[t].sum())
        per_tone[str(t)] = float(conf[t, t]) / row if row else None
    return {
        "accuracy": float(correct) / total if total else None,
        "correct": correct,
        "total": total,
        "per_tone_accuracy": per_tone,
        "confusion": conf.astype(int).tolist(),
    }


def tone_confusion(reference: Any, predicted: Any) -> np.ndarray:
    """由逐字參考／預測聲調（同長度，參考為 0 的位置略過）算出 [6, 6] 混淆矩陣。"""
    ref = np.asarray(reference, dtype=np.int64).reshape(-1)
    pred = np.asarray(predicted, dtype=np.int64).reshape(-1)
    if ref.shape != pred.shape:
        raise ValueError(f"參考 {ref.shape} 與預測 {pred.shape} 長度不同")
    if np.any((ref < 0) | (ref >= NUM_TONES)) or np.any((pred < 0) | (pred >= NUM_TONES)):
        raise ValueError(f"聲調編號須在 0..{NUM_TONES - 1}")
    conf = np.zeros((NUM_TONES, NUM_TONES), dtype=np.int64)
    keep = ref > 0
    np.add.at(conf, (ref[keep], pred[keep]), 1)
    return conf


def tone_accuracy_from_predictions(
    texts: Sequence[str], predicted: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """每句參考文字的漢字（依序）對上模型預測的聲調；回傳 accuracy、per_tone_accuracy、confusion。"""
    if len(texts) != len(predicted):
        raise ValueError(f"texts 有 {len(texts)} 句，predicted 有 {len(predicted)} 句")
    conf = np.zeros((NUM_TONES, NUM_TONES), dtype=np.int64)
    for i, (text, pred) in enumerate(zip(texts, predicted)):
        _, ref = han_tones(text)
        if len(pred) != len(ref):
            raise ValueError(f"第 {i} 句有 {len(ref)} 個漢字，預測了 {len(pred)} 個聲調")
        conf += tone_confusion(ref, pred)
    return _summary(conf)


def tone_accuracy_text(
    references: Sequence[str] | str, hypotheses: Sequence[str] | str
) -> dict[str, Any]:
    """參考文字對辨識文字的漢字聲調正確率（對齊規則見模組說明）。"""
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"參考 {len(refs)} 句、辨識 {len(hyps)} 句，數量不同")
    conf = np.zeros((NUM_TONES, NUM_TONES), dtype=np.int64)
    for ref_text, hyp_text in zip(refs, hyps):
        rc, rt = han_tones(ref_text)
        hc, ht = han_tones(hyp_text)
        if not rc:
            continue
        pred = np.zeros(len(rc), dtype=np.int64)
        if hc:
            out = jiwer.process_words(" ".join(rc), " ".join(hc))
            for chunk in out.alignments[0]:
                if chunk.type in ("equal", "substitute"):
                    for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
                        pred[chunk.ref_start_idx + k] = ht[chunk.hyp_start_idx + k]
        conf += tone_confusion(rt, pred)
    return _summary(conf)


def tone_head_summary(targets: Any, predicted: Any) -> dict[str, Any]:
    """聲調頭逐位置的預測對上目標（同形狀，目標 0 的位置不計分）→ 正確率與各聲調計數。

    回傳 `{accuracy, scored, correct, per_tone{"1".."5": {scored, correct, accuracy}}, confusion}`；
    沒有計分位置時 accuracy 為 None。
    """
    conf = tone_confusion(targets, predicted)
    scored = int(conf.sum())
    correct = int(np.trace(conf))
    per_tone = {}
    for t in range(1, NUM_TONES):
        n, ok = int(conf[t].sum()), int(conf[t, t])
        per_tone[str(t)] = {"scored": n, "correct": ok, "accuracy": ok / n if n else None}
    return {
        "accuracy": correct / scored if scored else None,
        "scored": scored,
        "correct": correct,
        "per_tone": per_tone,
        "confusion": conf.astype(int).tolist(),
    }
