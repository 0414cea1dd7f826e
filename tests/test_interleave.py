"""聲調感知交錯對齊、文字領先與 CosyVoice2 固定比例交錯：手算的放置結果與真實 Qwen 詞表上的性質。"""

from __future__ import annotations

import numpy as np
import pytest

from speakllm_jax.data.interleave import (
    IGNORE_ID,
    KIND_SOS,
    KIND_SPEECH,
    KIND_TASK,
    KIND_TEXT,
    align_text_to_frames,
    apply_text_lead,
    encode_for_alignment,
    interleave_fixed,
    num_frames_for,
    seconds_to_end_frame,
    seconds_to_frame,
    speech_units,
    token_char_spans,
    tone_aware_token_frames,
)


def _hand_tokens(parts: list[bytes]) -> tuple[str, np.ndarray]:
    text = b"".join(parts).decode("utf-8")
    return text, token_char_spans(text, parts)


def test_frame_grid_conversions():
    assert seconds_to_frame(1.12) == 28  # 1.12 / 0.04 = 28.000000000000004
    assert seconds_to_frame(0.079) == 1
    assert seconds_to_end_frame(0.081) == 3
    assert seconds_to_end_frame(0.08) == 2
    assert num_frames_for(640 * 10, 16000) == 10
    assert num_frames_for(640 * 10 + 1, 16000) == 11


def test_spans_follow_bytes_and_split_han():
    shi = "世".encode()
    parts = ["你好".encode(), shi[:2], shi[2:] + "界".encode(), b" hel", b"lo", "。".encode()]
    text, spans = _hand_tokens(parts)
    assert text == "你好世界 hello。"
    # 「世」的位元組被切成兩個符號：兩個符號的範圍都含有「世」（字元 2）
    assert spans.tolist() == [[0, 2], [2, 3], [2, 4], [4, 8], [8, 10], [10, 11]]
    with pytest.raises(ValueError, match="token_bytes"):
        token_char_spans("你好", [b"x"])


def test_tone_aware_uniform_placement_by_hand():
    parts = ["你好".encode(), "世".encode(), "界".encode(), b" hel", b"lo", "。".encode()]
    text, spans = _hand_tokens(parts)
    # 單位：你 好 世 界 hello → U = 5；N = 20 → 起始幀 floor(u·20/5) = 0, 4, 8, 12, 16
    assert speech_units(text) == [(0, 1), (1, 2), (2, 3), (3, 4), (5, 10)]
    frames = tone_aware_token_frames(text, spans, 20)
    # 你好→單位 0（幀 0，雙字符號整體放在第一個字）；世→8；界→12；" hel"→16；
    # "lo" 同屬 hello，錨點 16 → 順延到 17；"。" 跟在前一個之後 → 18
    assert frames.tolist() == [0, 8, 12, 16, 17, 18]


def test_split_han_character_is_never_separated():
    shi = "世".encode()
    parts = ["你好".encode(), shi[:2], shi[2:] + "界".encode()]
    text, spans = _hand_tokens(parts)
    # 單位 你 好 世 界，N = 8 → 起始幀 0, 2, 4, 6；「世」的前半符號錨在世（4），
    # 後半（含「界」）也以「世」為第一個字 → 4 → 順延 5：「界」不會先於「世」被放出
    assert tone_aware_token_frames(text, spans, 8).tolist() == [0, 4, 5]


def test_explicit_timing_truncation_and_tail_clamp():
    parts = ["你好".encode(), "世".encode(), "界".encode(), b" hel", b"lo", "。".encode()]
    text, spans = _hand_tokens(parts)
    # 音節時間給定：單位起點 0, 3, 6, 9, 12；段長 10 幀 → hello 在段外（語音被截斷），
    # " hel"、"lo" 與其後的 "。" 都不放入
    frames = tone_aware_token_frames(text, spans, 10, unit_start_frames=[0, 3, 6, 9, 12])
    assert frames.tolist() == [0, 6, 9, -1, -1, -1]
    # 三個符號擠在最後一幀：順延成 2, 3, 4 後超出 N = 3，從尾端往回收成 0, 1, 2
    text2, spans2 = _hand_tokens([b"", b"", "你".encode()])
    assert tone_aware_token_frames(text2, spans2, 3, unit_start_frames=[2]).tolist() == [0, 1, 2]
    # 已被截斷的段：錨點 0, 0, 1 的三個符號放不進 2 幀 → 只留前 2 個，其餘視為截斷
    text3, spans3 = _hand_tokens(["你".encode(), "好".encode(), "世".encode(), "界".encode()])
    got = tone_aware_token_frames(text3, spans3, 2, unit_start_frames=[0, 0, 1, 5])
    assert got.tolist() == [0, 1, -1, -1]
    with pytest.raises(ValueError, match="放不進"):
        tone_aware_token_frames(text2, spans2, 2)
    with pytest.raises(ValueError, match="unit_start_frames"):
        tone_aware_token_frames(text, spans, 10, unit_start_frames=[0, 1])


def test_ablation_is_uniform_and_toneless():
    parts = ["你好".encode(), "世".encode(), "界".encode(), b" hel", b"lo", "。".encode()]
    text, spans = _hand_tokens(parts)
    ids = np.arange(100, 106)
    tones = np.array([[3, 3], [4, 0], [4, 0], [0, 0], [0, 0], [0, 0]])
    out = align_text_to_frames(ids, tones, spans, text, 20, pad_id=-7, tone_aware=False)
    # floor(i·20/6), i = 0..5 → 0, 3, 6, 10, 13, 16
    assert out.token_frames.tolist() == [0, 3, 6, 10, 13, 16]
    assert not out.tones.any()
    on = align_text_to_frames(ids, tones, spans, text, 20, pad_id=-7, tone_aware=True)
    assert on.token_frames.tolist() == [0, 8, 12, 16, 17, 18]
    assert on.tones[[0, 8, 12]].tolist() == [[3, 3], [4, 0], [4, 0]]
    assert on.text_ids[[0, 8, 12, 16, 17, 18]].tolist() == list(range(100, 106))
    assert on.text_mask.sum() == 6 and (on.text_ids[~on.text_mask] == -7).all()


def test_real_tokenizer_multichar_tokens_on_syllable_starts(tok):
    text = "今天下午有可能下雨，出门记得带伞。我明天要去 meeting 討論 project。"
    enc = encode_for_alignment(tok, text)
    n_tok = len(enc["ids"])
    units = speech_units(enc["text"])
    N = 400
    out = align_text_to_frames(
        enc["ids"], enc["tones"], enc["spans"], enc["text"], N, pad_id=tok.eos_id
    )
    starts = (np.arange(len(units)) * N) // len(units)
    unit_of_char = {c: u for u, (a, b) in enumerate(units) for c in range(a, b)}
    frames = out.token_frames
    assert (np.diff(frames) > 0).all() and frames[0] >= 0 and frames[-1] < N
    merged = 0
    for t, (a, b) in enumerate(enc["spans"]):
        first = next((unit_of_char[c] for c in range(a, b) if c in unit_of_char), None)
        piece = enc["text"][a:b]
        if first is None:
            continue
        # 錨點 = 第一個可發音字元的音節起點；若與前一個符號同錨點則恰好順延到前一個符號之後
        prev_same = t > 0 and frames[t - 1] >= starts[first]
        assert frames[t] == (frames[t - 1] + 1 if prev_same else starts[first]), (t, piece)
        merged += sum(1 for ch in piece if "\u4e00" <= ch <= "\u9fff") >= 2
    assert merged >= 3  # 真實詞表確實把多個漢字合成一個符號（今天、下午、有可能…）
    # 每個符號帶著自己的聲調放在它的幀上
    assert (out.tones[frames] == enc["tones"]).all()
    assert (out.text_ids[frames] == enc["ids"]).all() and out.text_mask.sum() == n_tok
    assert tok.decode(out.text_ids[out.text_mask]) == enc["text"]


def test_apply_text_lead_by_hand():
    assert apply_text_lead([3, 4, 10, 11, -1], 2).tolist() == [1, 2, 8, 9, -1]
    # f - lead 低於段起點時收在段起點，再順延保持唯一：max(-3,0)=0, max(-2,0)=0→1, max(-1,0)=0→2
    assert apply_text_lead([0, 1, 2], 3).tolist() == [0, 1, 2]
    assert apply_text_lead([3, 4], 2, segment_start=2).tolist() == [2, 3]
    assert apply_text_lead([5, 9], 0).tolist() == [5, 9]
    with pytest.raises(ValueError):
        apply_text_lead([4, 4], 1)
    with pytest.raises(ValueError):
        apply_text_lead([1], -1)


def test_cosyvoice2_bistream_by_hand():
    text = list(range(1000, 1007))  # T = 7
    speech = list(range(30))  # S = 30 > 7 · 15 / 5
    out = interleave_fixed(text, speech, fill_id=6563, task_id=1, eos_id=6561, sos_id=0)
    assert out["mode"] == "bistream"
    IG = IGNORE_ID
    # ceil((7 + 1) / 5) = 2 塊：完整塊 [t0..t4, s0..s14]，目標 [IG×4, s0..s14, fill]；
    # 最後一塊 [t5, t6, task, s15..s29]，目標 [IG×2, s15..s29, eos]；最前面 sos（目標 IG）
    exp_in = [0] + text[:5] + speech[:15] + text[5:] + [1] + speech[15:]
    exp_kind = (
        [KIND_SOS]
        + [KIND_TEXT] * 5
        + [KIND_SPEECH] * 15
        + [KIND_TEXT] * 2
        + [KIND_TASK]
        + [KIND_SPEECH] * 15
    )
    exp_tgt = [IG] + [IG] * 4 + speech[:15] + [6563] + [IG] * 2 + speech[15:] + [6561]
    assert out["input_ids"].tolist() == exp_in
    assert out["input_kind"].tolist() == exp_kind
    assert out["target_ids"].tolist() == exp_tgt
    assert len(exp_in) == 1 + 20 + 2 + 1 + 15


def test_cosyvoice2_exact_multiple_and_unistream():
    text = list(range(1000, 1010))  # T = 10：ceil(11 / 5) = 3 塊，第三塊文字為空
    speech = list(range(40))
    out = interleave_fixed(text, speech, fill_id=99, task_id=1, eos_id=98)
    IG = IGNORE_ID
    exp_in = text[:5] + speech[:15] + text[5:] + speech[15:30] + [1] + speech[30:]
    exp_tgt = [IG] * 4 + speech[:15] + [99] + [IG] * 4 + speech[15:30] + [99] + speech[30:] + [98]
    assert out["input_ids"].tolist() == exp_in and out["target_ids"].tolist() == exp_tgt
    # 語音位置的目標就是下一個輸入（下一符號預測）
    ids, kind, tgt = out["input_ids"], out["input_kind"], out["target_ids"]
    for p in range(len(ids) - 1):
        if kind[p] == KIND_SPEECH and kind[p + 1] == KIND_SPEECH:
            assert tgt[p] == ids[p + 1]
    # 比例不足（20 / 10 = 2 ≤ 3）→ unistream：[文字, task, 語音]，目標 [IG×T, 語音, eos]
    uni = interleave_fixed(text, speech[:20], fill_id=99, task_id=1, eos_id=98)
    assert uni["mode"] == "unistream"
    assert uni["input_ids"].tolist() == text + [1] + speech[:20]
    assert uni["target_ids"].tolist() == [IG] * 10 + speech[:20] + [98]
    with pytest.raises(ValueError, match="bistream"):
        interleave_fixed(text, speech[:20], fill_id=99, task_id=1, eos_id=98, mode="bistream")
