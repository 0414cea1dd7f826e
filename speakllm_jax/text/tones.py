"""拼音聲調：逐字聲調（詞語感知，處理破音字）以及與 BPE 符號的對齊。

聲調編號：0 表示非漢字或無聲調（英文、數字、標點、特殊符號），1–4 為四聲，5 為輕聲。

對齊規則：Qwen 是位元組層級 BPE，一個漢字的 UTF-8 位元組可能被切到兩個符號；
此時漢字歸屬於「其最後一個位元組所在的符號」，聲調永遠不被拆開。一個符號合併了
多個漢字時，依序帶著所有漢字的聲調。
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pypinyin import Style, pinyin

from speakllm_jax.text.codeswitch import is_han

NUM_TONES = 6  # 0 到 5


def char_tones(text: str) -> list[int]:
    """每個字元的聲調編號（長度等於 `len(text)`）；以整句送入 pypinyin 以利用詞語讀音。"""
    tones = [0] * len(text)
    # 把連續漢字串一起送入，讓 pypinyin 的詞典決定破音字讀音。
    i = 0
    while i < len(text):
        if not is_han(text[i]):
            i += 1
            continue
        j = i
        while j < len(text) and is_han(text[j]):
            j += 1
        run = text[i:j]
        pys = pinyin(run, style=Style.TONE3, neutral_tone_with_five=True, errors="ignore")
        if len(pys) == len(run):
            for k, p in enumerate(pys):
                s = p[0]
                tones[i + k] = int(s[-1]) if s and s[-1].isdigit() else 0
        else:
            for k, ch in enumerate(run):
                p = pinyin(ch, style=Style.TONE3, neutral_tone_with_five=True, errors="ignore")
                s = p[0][0] if p and p[0] else ""
                tones[i + k] = int(s[-1]) if s and s[-1].isdigit() else 0
        i = j
    return tones


@dataclass
class Syllable:
    """一個漢字音節：在原文中的字元位置、聲調與所屬符號索引。"""

    char_index: int
    char: str
    tone: int
    token_index: int


@dataclass
class ToneAlignment:
    """聲調對齊結果。

    `tones`：`[num_tokens, max_chars_per_token]`，不足補 0；
    `primary`：`[num_tokens]`，每個符號第一個漢字的聲調（無漢字為 0）；
    `syllables`：每個漢字的音節資訊。
    """

    tones: np.ndarray
    primary: np.ndarray
    syllables: list[Syllable]


def align_tones_to_tokens(text: str, token_bytes: list[bytes],
                          max_chars_per_token: int = 4) -> ToneAlignment:
    """把逐字聲調對齊到 BPE 符號（`token_bytes` 為每個符號的原始位元組，特殊符號為空位元組）。

    符號位元組串接後必須等於 `text` 的 UTF-8 編碼（分詞器會做 NFC 正規化，
    因此呼叫端應傳入 NFC 後的文字）。
    """
    data = text.encode("utf-8")
    joined = b"".join(token_bytes)
    if joined != data:
        raise ValueError("符號位元組與文字不一致：請先對文字做 NFC 正規化，並傳入同一段文字的符號")
    # 每個字元最後一個位元組的位置 → 字元索引
    char_end = []
    pos = 0
    for ch in text:
        pos += len(ch.encode("utf-8"))
        char_end.append(pos - 1)
    # 每個位元組屬於哪個符號
    byte_token = np.empty(len(data), dtype=np.int64)
    pos = 0
    for t, b in enumerate(token_bytes):
        byte_token[pos:pos + len(b)] = t
        pos += len(b)
    tones_per_char = char_tones(text)
    n = len(token_bytes)
    tones = np.zeros((n, max_chars_per_token), dtype=np.int32)
    count = np.zeros(n, dtype=np.int64)
    syllables: list[Syllable] = []
    for ci, ch in enumerate(text):
        if not is_han(ch):
            continue
        t = int(byte_token[char_end[ci]])
        syllables.append(Syllable(ci, ch, tones_per_char[ci], t))
        if count[t] < max_chars_per_token:
            tones[t, count[t]] = tones_per_char[ci]
        count[t] += 1
    return ToneAlignment(tones=tones, primary=tones[:, 0].copy(), syllables=syllables)
