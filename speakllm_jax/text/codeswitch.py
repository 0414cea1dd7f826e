"""語碼轉換（中英混說）文字的片段切分、語言判定與增強。"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# 漢字（含擴充 A 區與相容表意文字）。
HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SPAN_RE = re.compile(
    rf"(?P<zh>[{HAN}]+)"
    r"|(?P<en>[A-Za-z][A-Za-z0-9]*(?:['’\-][A-Za-z0-9]+)*)"
    r"|(?P<num>[0-9]+(?:[.,][0-9]+)*%?)"
    r"|(?P<space>\s+)"
    r"|(?P<punct>.)",
    re.S,
)
_HAN_CHAR = re.compile(rf"[{HAN}]")


@dataclass(frozen=True)
class Span:
    """一段同語言的文字：`kind` 為 zh／en／num／punct，`start`、`end` 為字元位置。"""

    text: str
    kind: str
    start: int
    end: int


def is_han(ch: str) -> bool:
    """單一字元是否為漢字。"""
    return bool(_HAN_CHAR.fullmatch(ch))


def split_spans(text: str) -> list[Span]:
    """把文字切成漢字串、英文詞、數字與標點片段（空白不輸出）。"""
    spans = []
    for m in _SPAN_RE.finditer(text):
        kind = m.lastgroup
        if kind == "space":
            continue
        spans.append(Span(m.group(), kind, m.start(), m.end()))
    return spans


def language_of(text: str) -> str:
    """判定整句語言："zh"、"en" 或 "mixed"（同時有漢字與英文詞）。無字母與漢字時視為 "zh"。"""
    kinds = {s.kind for s in split_spans(text)}
    has_zh, has_en = "zh" in kinds, "en" in kinds
    if has_zh and has_en:
        return "mixed"
    if has_en:
        return "en"
    return "zh"


def scoring_units(text: str) -> list[str]:
    """評分單位：每個漢字一個單位，每個英文詞一個單位（小寫），數字串一個單位；標點略去。"""
    units: list[str] = []
    for s in split_spans(text):
        if s.kind == "zh":
            units.extend(s.text)
        elif s.kind == "en":
            units.append(s.text.lower())
        elif s.kind == "num":
            units.append(s.text)
    return units


# 中英小詞典：語碼轉換增強時把中文詞換成常見的英文說法。
CODESWITCH_LEXICON: dict[str, str] = {
    "会议": "meeting",
    "會議": "meeting",
    "电脑": "computer",
    "電腦": "computer",
    "手机": "phone",
    "手機": "phone",
    "项目": "project",
    "項目": "project",
    "报告": "report",
    "報告": "report",
    "邮件": "email",
    "郵件": "email",
    "老板": "boss",
    "老闆": "boss",
    "截止日期": "deadline",
    "演示": "demo",
    "团队": "team",
    "團隊": "team",
    "咖啡": "coffee",
    "计划": "plan",
    "計畫": "plan",
    "问题": "problem",
    "問題": "problem",
    "周末": "weekend",
    "週末": "weekend",
}


def codeswitch_augment(text: str, rng: np.random.Generator, prob: float = 0.5,
                       lexicon: dict[str, str] | None = None) -> str:
    """以機率 `prob` 把詞典中的中文詞換成英文詞（前後加空白以保持英文詞完整）；由 `rng` 決定，可重現。"""
    lex = lexicon or CODESWITCH_LEXICON
    keys = sorted(lex, key=len, reverse=True)
    out: list[str] = []
    i = 0
    while i < len(text):
        for k in keys:
            if text.startswith(k, i):
                if rng.random() < prob:
                    out.append(f" {lex[k]} ")
                else:
                    out.append(k)
                i += len(k)
                break
        else:
            out.append(text[i])
            i += 1
    from speakllm_jax.text.normalize import fix_spaces

    return fix_spaces("".join(out))
