"""聲調：破音字、與真實 Qwen BPE 符號的對齊。"""

import numpy as np
import pytest
from pypinyin import Style, pinyin

from speakllm_jax.text.tokenizer import TextTokenizer, load_tokenizer
from speakllm_jax.text.tones import align_tones_to_tokens, char_tones


@pytest.fixture(scope="module")
def tt(qwen_tokenizer_dir):
    return TextTokenizer(load_tokenizer(qwen_tokenizer_dir))


@pytest.mark.parametrize(
    "text,index,tone",
    [
        ("我去银行取钱", 3, 2),  # 行 háng
        ("他在路上行走", 4, 2),  # 行 xíng
        ("这件事很重要", 4, 4),  # 重 zhòng
        ("我们重新开始", 2, 2),  # 重 chóng
        ("孩子长大了", 2, 3),  # 长 zhǎng
        ("这条路的长度", 4, 2),  # 长 cháng
        ("好的吧", 1, 5),  # 的 輕聲
    ],
)
def test_polyphones(text, index, tone):
    assert char_tones(text)[index] == tone


def test_non_han_gets_zero():
    t = char_tones("我用iPhone 15。")
    assert t[0] == 3 and t[1] == 4
    assert all(x == 0 for x in t[2:])


def _tones_of(s):
    return [int(p[0][-1]) for p in pinyin(s, style=Style.TONE3, neutral_tone_with_five=True)]


def test_alignment_to_real_bpe_tokens(tt):
    text = "我今天去银行开meeting。"
    r = tt.encode_with_tones(text)
    pieces = [tt.decode([i]) for i in r["ids"]]
    # 每個符號的聲調等於它所含漢字的聲調（依序），非漢字符號為 0
    for piece, row in zip(pieces, r["tones"]):
        han = [c for c in piece if "\u4e00" <= c <= "\u9fff"]
        expect = (
            [
                char_tones(text)[text.index(piece) + k]
                for k in range(len(piece))
                if "\u4e00" <= piece[k] <= "\u9fff"
            ]
            if han
            else []
        )
        assert list(row[: len(expect)]) == expect
        assert not row[len(expect) :].any()
    # 「银行」在 Qwen 詞表中是一個符號，帶著兩個聲調 yin2 hang2
    idx = pieces.index("银行")
    assert list(r["tones"][idx][:2]) == [2, 2]
    assert r["primary_tone"][pieces.index("meeting")] == 0


def test_multichar_tokens_and_split_bytes(tt):
    # 罕用字會被位元組層級 BPE 拆成多個符號；聲調只出現在最後一個位元組所在的符號
    text = "龘靐齉爩，行走"
    ids = tt.encode(text)
    tb = tt.token_bytes(ids)
    align = align_tones_to_tokens(text, tb, 4)
    total = int((align.tones > 0).sum())
    assert total == len([c for c in text if "\u4e00" <= c <= "\u9fff"])
    assert len(ids) > len(text) - 1  # 確實有字被拆成多個符號
    for syl in align.syllables:
        end = sum(len(b) for b in tb[: syl.token_index + 1])
        start = end - len(tb[syl.token_index])
        char_last_byte = len(text[: syl.char_index + 1].encode()) - 1
        assert start <= char_last_byte < end
    assert [s.tone for s in align.syllables][-2:] == _tones_of("行走")


def test_mismatched_tokens_rejected(tt):
    with pytest.raises(ValueError, match="NFC"):
        align_tones_to_tokens("你好", [b"x"], 4)
    assert np.asarray(tt.encode_with_tones("")["ids"]).size == 0
