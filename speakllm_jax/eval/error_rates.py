"""辨識錯誤率：CER（中文）、WER（英文）、MER（中英混說）與 PIER（混說詞）。

所有分數都先經過專案的評分正規化（`normalize_for_scoring`：繁轉簡、去標點、小寫），
再切成評分單位：每個漢字一個單位、每個英文詞一個單位、每個數字串一個單位。

- MER = (S + D + I) / N，N = 參考中的漢字數 + 英文詞數（+ 數字串數）。
  純中文時等於 CER，純英文時等於 WER，因此三者共用同一套計算。
- PIER（point-of-interest error rate）：只看「夾在中文句子裡的英文詞」這些參考位置，
  PIER = (S_poi + D_poi) / N_poi；插入錯誤不歸屬於任何參考位置，因此不計入。
  參考句沒有漢字時沒有混說詞，N_poi 為 0。

對齊用 `jiwer.process_words`（Levenshtein，與 jiwer 的 cer／wer 相同的對齊）。
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import jiwer

from speakllm_jax.text.codeswitch import is_han, scoring_units
from speakllm_jax.text.normalize import normalize_for_scoring


@dataclass
class ErrorCounts:
    """可累加的錯誤計數。"""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_units: int = 0
    poi_errors: int = 0
    poi_units: int = 0
    utterances: int = 0
    per_utterance: list[float] = field(default_factory=list)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.ref_units + other.ref_units,
            self.poi_errors + other.poi_errors,
            self.poi_units + other.poi_units,
            self.utterances + other.utterances,
            self.per_utterance + other.per_utterance,
        )

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """(S + D + I) / N；N 為 0 時，沒有錯誤回傳 0，否則回傳 inf。"""
        if self.ref_units == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.ref_units

    @property
    def pier(self) -> float:
        return self.poi_errors / self.poi_units if self.poi_units else 0.0


def _units(text: str, normalize: bool) -> list[str]:
    return scoring_units(normalize_for_scoring(text) if normalize else text)


def _poi_mask(units: list[str]) -> list[bool]:
    """參考單位中哪些是混說詞（句中有漢字時的英文詞）。"""
    has_han = any(len(u) == 1 and is_han(u) for u in units)
    return [has_han and u[:1].isascii() and u[:1].isalpha() for u in units]


def count_errors(reference: str, hypothesis: str, normalize: bool = True) -> ErrorCounts:
    """單句的 S／D／I、N 與混說詞錯誤。"""
    ref = _units(reference, normalize)
    hyp = _units(hypothesis, normalize)
    poi = _poi_mask(ref)
    c = ErrorCounts(ref_units=len(ref), poi_units=sum(poi), utterances=1)
    if not ref:
        c.insertions = len(hyp)
    elif not hyp:
        c.deletions = len(ref)
        c.poi_errors = sum(poi)
    else:
        out = jiwer.process_words(" ".join(ref), " ".join(hyp))
        c.substitutions, c.deletions, c.insertions = (
            out.substitutions,
            out.deletions,
            out.insertions,
        )
        for chunk in out.alignments[0]:
            if chunk.type in ("substitute", "delete"):
                c.poi_errors += sum(poi[chunk.ref_start_idx : chunk.ref_end_idx])
    c.per_utterance = [c.rate]
    return c


def corpus_counts(
    references: Iterable[str], hypotheses: Iterable[str], normalize: bool = True
) -> ErrorCounts:
    """整個語料的累加計數（錯誤總數 / 參考單位總數）。"""
    refs, hyps = list(references), list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"參考句數 {len(refs)} 與假設句數 {len(hyps)} 不同")
    total = ErrorCounts()
    for r, h in zip(refs, hyps):
        total = total + count_errors(r, h, normalize)
    return total


def mer(
    references: Iterable[str] | str, hypotheses: Iterable[str] | str, normalize: bool = True
) -> float:
    """混合錯誤率（漢字與英文詞為單位）。"""
    if isinstance(references, str):
        references, hypotheses = [references], [hypotheses]
    return corpus_counts(references, hypotheses, normalize).rate


def cer(
    references: Iterable[str] | str, hypotheses: Iterable[str] | str, normalize: bool = True
) -> float:
    """中文字錯誤率：句子只有漢字時與 MER 相同（英文詞若存在則以詞為單位）。"""
    return mer(references, hypotheses, normalize)


def wer(
    references: Iterable[str] | str, hypotheses: Iterable[str] | str, normalize: bool = True
) -> float:
    """英文詞錯誤率：句子只有英文時與 MER 相同。"""
    return mer(references, hypotheses, normalize)


def pier(
    references: Iterable[str] | str, hypotheses: Iterable[str] | str, normalize: bool = True
) -> float:
    """混說詞錯誤率（見模組說明）。"""
    if isinstance(references, str):
        references, hypotheses = [references], [hypotheses]
    return corpus_counts(references, hypotheses, normalize).pier
