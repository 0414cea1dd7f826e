"""錯誤率：與 jiwer 重疊處一致，混說句以手算計數驗證。"""

import jiwer
import pytest

from speakllm_jax.eval.error_rates import cer, corpus_counts, count_errors, mer, pier, wer


def test_cer_matches_jiwer_on_chinese():
    refs = ["今天天气很好", "我们去银行取钱", "你好"]
    hyps = ["今天天气不好", "我们去行取钱了", "你好吗"]
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


def test_wer_matches_jiwer_on_english():
    refs = ["the quick brown fox", "hello world"]
    hyps = ["the quick brown box jumps", "hello"]
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))


def test_normalization_before_scoring():
    assert cer("今天天气很好，我们去银行。", "今天天氣很好我們去銀行") == 0.0
    assert wer("Hello, World!", "hello world") == 0.0


def test_mixed_error_rate_by_hand():
    # 參考單位：我 要 开 一 个 meeting 然 后 去 bank = 10（8 漢字 + 2 英文詞）
    ref = "我要开一个meeting，然后去bank"
    # 假設：我 刪除（D），meeting→meetings（S），多了 吧（I）
    hyp = "要开一个meetings然后去bank吧"
    c = count_errors(ref, hyp)
    assert (c.substitutions, c.deletions, c.insertions, c.ref_units) == (1, 1, 1, 10)
    assert mer(ref, hyp) == pytest.approx(3 / 10)
    # 混說詞：meeting 與 bank，共 2 個，錯 1 個
    assert (c.poi_errors, c.poi_units) == (1, 2)
    assert pier(ref, hyp) == pytest.approx(0.5)


def test_pier_ignores_monolingual_english_and_corpus_sums():
    c = corpus_counts(["good morning", "我的phone坏了"], ["good evening", "我的fone坏了"])
    assert c.poi_units == 1 and c.poi_errors == 1
    assert c.ref_units == 2 + 5  # 我 的 phone 坏 了
    assert c.rate == pytest.approx(2 / 7)
    assert c.per_utterance == [pytest.approx(0.5), pytest.approx(0.2)]


def test_empty_cases():
    assert mer("", "") == 0.0
    assert mer("你好", "") == 1.0
    assert mer("", "多") == float("inf")
    with pytest.raises(ValueError, match="句數"):
        corpus_counts(["a"], ["a", "b"])
