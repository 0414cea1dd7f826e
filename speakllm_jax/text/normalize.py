"""中文優先的文字正規化：繁簡轉換、全半形、標點、標註記號、空白與數字讀法。

規則（皆為冪等：正規化兩次與一次結果相同）：
- OpenCC 轉換（預設 t2s：訓練目標一律為簡體中文）。
- 全形英數轉半形；中文標點統一為一組固定的全形標點，英文句內標點保持半形。
- 移除語料中的標註記號，例如 `[noise]`、`<unk>`、`(laughter)`、`#`、`*`、`~`。
- 空白：漢字之間不留空白，英文詞之間一個空白，漢字與英文詞之間不加空白；英文詞本身不拆開。
- 可選的數字讀法（cn2an）：2024年 → 二零二四年、3.5 → 三点五、50% → 百分之五十。
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import opencc

from speakllm_jax.text.codeswitch import HAN, fix_spaces

CONVERSIONS = ("t2s", "s2t", "tw2s", "hk2s", "t2tw", "none")

_ANNOTATION_RE = re.compile(
    r"\[[^\[\]]{0,40}\]"  # [noise] [laughter] [+] 等
    r"|<[^<>\s|]{0,20}>"  # <unk> <sil>（不碰 <|special|> 類符號）
    r"|\((?:laughter|noise|cough|breath|unk|music|sil)\)"
    r"|[#*~^]",
    re.I,
)
# 中文標點統一表（半形或變體 → 正規全形）；只在鄰近漢字時套用。
_ZH_PUNCT = {
    ",": "，",
    "、": "、",
    ".": "。",
    "．": "。",
    "?": "？",
    "!": "！",
    ":": "：",
    ";": "；",
    "「": "“",
    "」": "”",
    "『": "‘",
    "』": "’",
    "〝": "“",
    "〞": "”",
    "(": "（",
    ")": "）",
    "﹐": "，",
    "﹑": "、",
    "﹒": "。",
    "﹖": "？",
    "﹗": "！",
}
_ALL_PUNCT = "，、。？！：；“”‘’（）,.?!:;\"'()「」『』《》〈〉…—-·"
_HAN_RE = re.compile(rf"[{HAN}]")


@lru_cache(maxsize=8)
def _converter(conversion: str):
    return opencc.OpenCC(conversion)


def convert_script(text: str, conversion: str = "t2s") -> str:
    """以 OpenCC 轉換字形；conversion 為 "none" 時原樣回傳。"""
    if conversion not in CONVERSIONS:
        raise ValueError(f"未知的轉換 {conversion!r}；可用：{CONVERSIONS}")
    if conversion == "none" or not text:
        return text
    return _converter(conversion).convert(text)


def to_halfwidth(text: str) -> str:
    """全形英數與空白轉半形；中文標點保持全形。"""
    out = []
    for ch in text:
        code = ord(ch)
        if code == 0x3000:
            out.append(" ")
        elif 0xFF10 <= code <= 0xFF19 or 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A:
            out.append(chr(code - 0xFEE0))
        elif ch in "％＋＠＆＄":
            out.append(chr(code - 0xFEE0))
        else:
            out.append(ch)
    return "".join(out)


def remove_annotations(text: str) -> str:
    """移除語料轉寫中的標註記號。"""
    return _ANNOTATION_RE.sub(" ", text)


def _normalize_punct(text: str) -> str:
    """漢字旁的標點統一為全形中文標點；純英文片段內的標點保持半形。"""
    chars = list(text)
    for i, ch in enumerate(chars):
        if ch not in _ZH_PUNCT:
            continue
        if (
            ch == "."
            and 0 < i < len(chars) - 1
            and chars[i - 1].isdigit()
            and chars[i + 1].isdigit()
        ):
            continue  # 小數點
        prev_han = i > 0 and bool(_HAN_RE.match(chars[i - 1]))
        next_han = i + 1 < len(chars) and bool(_HAN_RE.match(chars[i + 1]))
        if prev_han or next_han or ch in "「」『』〝〞﹐﹑﹒﹖﹗、．":
            chars[i] = _ZH_PUNCT[ch]
    return "".join(chars)


def verbalize_numbers(text: str) -> str:
    """阿拉伯數字改為中文讀法（年份逐位、小數、百分比），英文詞內的數字不動。"""
    # 延後匯入：cn2an 載入約 0.2 秒，只在數字轉寫時需要
    import cn2an

    parts = re.split(r"([A-Za-z][A-Za-z0-9'\-]*)", text)
    for k in range(0, len(parts), 2):
        if re.search(r"[0-9]", parts[k]):
            parts[k] = cn2an.transform(parts[k], "an2cn")
    return "".join(parts)


def normalize_zh(
    text: str,
    conversion: str = "t2s",
    verbalize: bool = False,
    keep_punct: bool = True,
    lowercase: bool = False,
) -> str:
    """中文優先的正規化；英文詞保持完整。詳見模組說明。"""
    if not isinstance(text, str):
        raise TypeError(f"text 應為 str，得到 {type(text).__name__}")
    t = unicodedata.normalize("NFC", text)
    t = to_halfwidth(t)
    t = remove_annotations(t)
    t = convert_script(t, conversion)
    if verbalize:
        t = verbalize_numbers(t)
    t = fix_spaces(t)
    t = _normalize_punct(t)
    if not keep_punct:
        t = strip_punct(t)
    if lowercase:
        t = t.lower()
    return fix_spaces(t)


def strip_punct(text: str) -> str:
    """去除標點（評分用）；英文縮寫的撇號保留。"""
    t = re.sub(
        r"(?<=[A-Za-z])['’](?=[A-Za-z])|(?<=[0-9])\.(?=[0-9])",
        lambda m: "\0" if m.group() != "." else "\1",
        text,
    )
    t = "".join(
        " " if (ch in _ALL_PUNCT or unicodedata.category(ch).startswith("P")) else ch for ch in t
    )
    return fix_spaces(t.replace("\0", "'").replace("\1", "."))


def normalize_en(text: str) -> str:
    """英文評分正規化：小寫、去標點、單一空白。"""
    return strip_punct(unicodedata.normalize("NFKC", text)).lower()


def normalize_for_scoring(text: str, conversion: str = "t2s") -> str:
    """錯誤率計算前的正規化：正規化、去標點、小寫。"""
    return normalize_zh(text, conversion=conversion, keep_punct=False, lowercase=True)
