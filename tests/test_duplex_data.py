"""全雙工訓練樣本：在真實的示範雙聲道對話（espeak-ng 合成）上檢查幀數、搶話、附和、文字領先與消融開關。"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import soundfile as sf

from speakllm_jax.data.adapters import run_adapter
from speakllm_jax.data.demo_corpus import ensure_demo_corpus, has_espeak
from speakllm_jax.data.duplex import DuplexConfig, build_duplex_example
from speakllm_jax.data.interleave import (
    align_text_to_frames,
    encode_for_alignment,
    seconds_to_end_frame,
    seconds_to_frame,
)
from speakllm_jax.data.overlap import OverlapConfig
from speakllm_jax.labels import TurnAction
from speakllm_jax.text.normalize import normalize_zh
from speakllm_jax.text.tokenizer import TextTokenizer

pytestmark = pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")

R = 6
LEAD = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory, qwen_tokenizer_dir):
    root = ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")
    rows = run_adapter("dialogue", root / "dialogues")
    assert len(rows) >= 3
    tok = TextTokenizer.from_dir(qwen_tokenizer_dir)
    cfg = DuplexConfig(lead_frames=LEAD, overlap=OverlapConfig(reaction_frames=R))
    examples = [build_duplex_example(r, tok, cfg) for r in rows]
    return rows, tok, cfg, examples


def _host(row, onset):
    return [
        t for t in row["turns"] if t["speaker"] == "assistant" and t["start"] <= onset < t["end"]
    ][0]


def test_frames_match_audio(data):
    rows, _, _, examples = data
    for row, ex in zip(rows, examples):
        wave, sr = sf.read(row["audio"], dtype="float32", always_2d=True)
        assert sr == 16000
        assert ex.num_frames == math.ceil(row["duration"] / 0.04 - 1e-9)
        assert ex.num_frames == -(-wave.shape[0] // 640)
        assert ex.user_audio.shape == ex.assistant_audio.shape == (ex.num_frames * 640,)
        assert np.allclose(ex.user_audio[: wave.shape[0]], wave[:, 0], atol=1e-4)
        assert np.allclose(ex.assistant_audio[: wave.shape[0]], wave[:, 1], atol=1e-4)
        assert not ex.user_audio[wave.shape[0] :].any()
        for arr in (
            ex.text_ids,
            ex.text_mask,
            ex.turn_targets,
            ex.turn_weight,
            ex.speech_weight,
            ex.code_weight,
        ):
            assert arr.shape == (ex.num_frames,)
        k = data[2].max_chars_per_token
        assert ex.text_tones.shape == (ex.num_frames, k) and ex.codes.shape == (4, ex.num_frames)
        users = [t for t in row["turns"] if t["speaker"] == "user" and t["kind"] != "backchannel"]
        assert ex.user_turns.tolist() == [
            [seconds_to_frame(t["start"]), seconds_to_end_frame(t["end"])] for t in users
        ]


def test_barge_in_yields_and_masks_speech(data):
    rows, _, _, examples = data
    n_barge = 0
    for row, ex in zip(rows, examples):
        for o in row["overlaps"]:
            if o["kind"] != "barge_in":
                continue
            n_barge += 1
            onset = seconds_to_frame(o["onset"])
            host_end = seconds_to_end_frame(_host(row, o["onset"])["end"])
            tt = ex.turn_targets
            assert tt[onset - 1] == TurnAction.CONTINUE  # 搶話前助理在說
            yields = np.flatnonzero(tt[onset : onset + R] == TurnAction.YIELD)
            assert len(yields) == R and yields[0] == 0  # 起點那幀就開始 YIELD，持續 R 幀
            assert host_end > onset + R  # 示範音訊在搶話 0.25 s 後才停 → 至少一幀被遮
            assert (ex.speech_weight[onset + R : host_end] == 0).all()
            assert (tt[onset + R : host_end] == TurnAction.LISTEN).all()
            assert not ex.text_mask[onset + R : host_end].any()
            assert ex.turn_weight[onset] == 2.0
        # 遮掉的只有搶話後的部分
        assert (ex.speech_weight == 0).sum() == sum(
            seconds_to_end_frame(_host(row, o["onset"])["end"]) - seconds_to_frame(o["onset"]) - R
            for o in row["overlaps"]
            if o["kind"] == "barge_in"
        )
    assert n_barge == len(rows)


def test_backchannel_keeps_assistant_talking(data):
    rows, tok, cfg, examples = data
    for row, ex in zip(rows, examples):
        bcs = [o for o in row["overlaps"] if o["kind"] == "backchannel"]
        assert bcs
        for o in bcs:
            s, e = seconds_to_frame(o["start"]), seconds_to_end_frame(o["end"])
            assert (ex.turn_targets[s:e] == TurnAction.CONTINUE).all()
            assert (ex.speech_weight[s:e] == 1).all()
        # 拿掉附和標註（與附和的使用者發言）重建：助理的目標與語音權重完全相同
        r2 = copy.deepcopy(row)
        r2["overlaps"] = [o for o in r2["overlaps"] if o["kind"] != "backchannel"]
        r2["turns"] = [t for t in r2["turns"] if t["kind"] != "backchannel"]
        ex2 = build_duplex_example(r2, tok, cfg)
        assert (ex2.turn_targets == ex.turn_targets).all()
        assert (ex2.speech_weight == ex.speech_weight).all()
        assert (ex2.text_ids == ex.text_ids).all()


def test_text_lead_is_exact_and_text_matches_turns(data):
    rows, tok, cfg, examples = data
    for row, ex in zip(rows, examples):
        a_turns = [t for t in row["turns"] if t["speaker"] == "assistant"]
        assert len(ex.token_frames) == len(a_turns)
        for t, f1, f0 in zip(a_turns, ex.token_frames, ex.token_frames_no_lead):
            placed = f0 >= 0
            assert placed.any()
            assert (f1[placed] == f0[placed] - LEAD).all()
            assert (f1[~placed] == -1).all()
            s = seconds_to_frame(t["start"])
            assert (
                f1[placed][0] == s - LEAD and f0[placed][0] == s
            )  # 第一個符號在語音起點前 LEAD 幀
            if t["kind"] != "interrupted":
                assert placed.all()
                ids = ex.text_ids[f1]
                assert tok.decode(ids) == normalize_zh(t["text"], "t2s")
            else:
                assert not placed.all()  # 被截斷的段只放得下前半句
        # 文字遮罩 = 放入的符號中，不在「搶話後被遮掉」幀上的那些
        placed_frames = np.concatenate([f[f >= 0] for f in ex.token_frames])
        assert ex.text_mask.sum() == int((ex.speech_weight[placed_frames] > 0).sum())
        assert (
            np.flatnonzero(ex.text_mask)
            == np.sort(placed_frames[ex.speech_weight[placed_frames] > 0])
        ).all()


def test_ablations_turn_each_module_off(data):
    rows, tok, cfg, examples = data
    row, ex = rows[0], examples[0]
    # 文字領先關掉：領先後的幀等於領先前
    no_lead = build_duplex_example(row, tok, dataclasses.replace(cfg, lead_frames=0))
    for f1, f0 in zip(no_lead.token_frames, ex.token_frames_no_lead):
        assert (f1 == f0).all()
    assert (no_lead.turn_targets == ex.turn_targets).all()
    # 聲調感知關掉：每段 floor(i·L/n) 均勻放置、聲調全 0，等於直接呼叫均勻放置的結果
    flat = build_duplex_example(row, tok, dataclasses.replace(cfg, tone_aware=False, lead_frames=0))
    assert not flat.text_tones.any()
    a_turns = [t for t in row["turns"] if t["speaker"] == "assistant"]
    for t, f in zip(a_turns, flat.token_frames):
        enc = encode_for_alignment(tok, normalize_zh(t["text"], "t2s"))
        s, e = seconds_to_frame(t["start"]), seconds_to_end_frame(t["end"])
        plain = align_text_to_frames(
            enc["ids"], enc["tones"], enc["spans"], enc["text"], e - s, pad_id=0, tone_aware=False
        )
        assert (f == plain.token_frames + s).all()
        assert (f - s).tolist() == [(i * (e - s)) // len(f) for i in range(len(f))]
    assert (flat.turn_targets == ex.turn_targets).all()
    # 重疊感知關掉：純輪替目標（助理段 SPEAK + CONTINUE，其餘 LISTEN），權重全 1
    off = build_duplex_example(
        row, tok, dataclasses.replace(cfg, overlap=OverlapConfig(ablation=True))
    )
    expect = np.zeros(off.num_frames, dtype=np.int32)
    for t in a_turns:
        s, e = seconds_to_frame(t["start"]), seconds_to_end_frame(t["end"])
        expect[s] = TurnAction.SPEAK
        expect[s + 1 : e] = TurnAction.CONTINUE
    assert (off.turn_targets == expect).all()
    assert (off.speech_weight == 1).all() and (off.turn_weight == 1).all()
    assert (off.text_ids == ex.text_ids).all()


def test_codes_weights_and_determinism(data):
    rows, tok, cfg, examples = data
    row, ex = rows[1], examples[1]
    assert (ex.code_weight == 0).all() and not ex.codes.any()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, size=(4, ex.num_frames - 1)).astype(np.int16)
    withc = build_duplex_example(row, tok, cfg, codes=codes)
    assert (withc.codes[:, :-1] == codes).all() and (withc.codes[:, -1] == 0).all()
    assert (withc.code_weight[:-1] == ex.speech_weight[:-1]).all() and withc.code_weight[-1] == 0
    with pytest.raises(ValueError, match="codes"):
        build_duplex_example(row, tok, cfg, codes=codes[:, :-10])
    again = build_duplex_example(row, tok, cfg)
    for k, v in ex.arrays().items():
        assert (again.arrays()[k] == v).all(), k
    with pytest.raises(ValueError, match="turns"):
        build_duplex_example({k: v for k, v in row.items() if k != "turns"}, tok, cfg)
