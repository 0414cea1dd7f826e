"""文字正規化：繁轉簡、英文詞保留、全半形、標註記號、冪等；以及清單 CLI。"""

import json
import subprocess
import sys
from pathlib import Path

import opencc
import pytest

from speakllm_jax.text.codeswitch import codeswitch_augment, language_of, split_spans
from speakllm_jax.text.normalize import normalize_for_scoring, normalize_zh

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    "今天天氣很好，我們去銀行。",
    "我用iPhone拍了一張photo",
    "我 今天 要 开 一个 meeting ， 然后 去 bank",
    "ＡＢＣ１２３全形字",
    "[noise]你好<unk>嗎 (laughter) #",
    "Hello, world! It's fine.",
    "2024年體重3.5公斤，漲了50%",
    "他說：「好的」",
    "  多個   空白\t和\n換行 ",
    "臺灣的 Machine Learning 課程",
]


def test_traditional_to_simplified():
    out = normalize_zh("今天天氣很好，我們去銀行。")
    assert out == "今天天气很好，我们去银行。"
    assert out == opencc.OpenCC("t2s").convert("今天天氣很好，我們去銀行。")


def test_english_words_survive():
    assert normalize_zh("我用iPhone拍了一張photo") == "我用iPhone拍了一张photo"
    assert normalize_zh("臺灣的 Machine Learning 課程") == "台湾的Machine Learning课程"
    assert normalize_zh("Hello, world! It's fine.") == "Hello, world! It's fine."


def test_width_annotations_spaces():
    assert normalize_zh("ＡＢＣ１２３全形字") == "ABC123全形字"
    assert normalize_zh("[noise]你好<unk>嗎 (laughter) #") == "你好吗"
    assert normalize_zh("我 今天 要 开 一个 meeting ， 然后") == "我今天要开一个meeting，然后"
    assert normalize_zh("他說：「好的」") == "他说：“好的”"


def test_number_verbalisation():
    assert normalize_zh("2024年體重3.5公斤", verbalize=True) == "二零二四年体重三点五公斤"
    assert normalize_zh("漲了50%", verbalize=True) == "涨了百分之五十"


@pytest.mark.parametrize("text", CASES)
def test_idempotent(text):
    for kw in ({}, {"verbalize": True}, {"keep_punct": False}, {"lowercase": True}):
        once = normalize_zh(text, **kw)
        assert normalize_zh(once, **kw) == once
    s = normalize_for_scoring(text)
    assert normalize_for_scoring(s) == s


def test_bad_conversion_named():
    with pytest.raises(ValueError, match="xx2yy"):
        normalize_zh("你好", conversion="xx2yy")


def test_codeswitch_spans_and_language():
    spans = split_spans("我今天要开一个meeting，然后3.5小时")
    assert [s.kind for s in spans] == ["zh", "en", "punct", "zh", "num", "zh"]
    assert spans[1].text == "meeting"
    assert language_of("今天很好") == "zh"
    assert language_of("good morning") == "en"
    assert language_of("今天的meeting") == "mixed"


def test_codeswitch_augment_deterministic():
    import numpy as np

    text = "明天的会议要准备报告和邮件"
    a = codeswitch_augment(text, np.random.default_rng(3), prob=1.0)
    assert a == "明天的meeting要准备report和email"
    b1 = codeswitch_augment(text, np.random.default_rng(7), prob=0.5)
    b2 = codeswitch_augment(text, np.random.default_rng(7), prob=0.5)
    assert b1 == b2
    assert codeswitch_augment(text, np.random.default_rng(7), prob=0.0) == text


def test_cli_normalizes_and_reports(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "text": "今天天氣很好"},
        {"id": "b", "text": "   "},
        {"id": "c", "text": "對話", "turns": [{"speaker": "user", "text": "銀行在哪裡"}]},
    ]
    with src.open("wb") as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
        f.write(b'{"id": "d", "text": "\xff\xfe bad"}\n')
        f.write(b"not json\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data/normalize_text_zh.py"),
            "--manifest",
            str(src),
            "--output",
            str(out),
            "--conversion",
            "t2s",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "c"]
    assert got[0]["text"] == "今天天气很好" and got[0]["text_raw"] == "今天天氣很好"
    assert got[1]["turns"][0]["text"] == "银行在哪里"
    skipped = [json.loads(x) for x in (tmp_path / "out.skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["bad_json", "empty_text", "non_utf8"]
    assert "略過 3" in res.stdout
