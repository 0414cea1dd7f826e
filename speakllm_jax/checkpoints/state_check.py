"""狀態字典（鍵 → 張量）與模型預期的嚴格比對：列出缺少、多出與形狀不符的鍵。

只比對名稱與形狀，不匯入 torch；PyTorch 端的載入器（S3Tokenizer、flow、HiFT）共用，
各自把回傳的說明接在自己的錯誤訊息（檔名、模型名）之後。
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _listed(items: Sequence[str], limit: int | None) -> str:
    if limit is None or len(items) <= limit:
        return f"[{', '.join(items)}]"
    return f"[{', '.join(items[:limit])} …（另 {len(items) - limit} 個）]"


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """鍵 → 形狀（取各值的 `.shape`）。"""
    return {k: tuple(v.shape) for k, v in state.items()}


def state_dict_problems(
    found: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    limit: int | None = None,
) -> list[str]:
    """比對檔案中的 `鍵 → 形狀` 與模型預期的 `鍵 → 形狀`；一致時回傳空清單。

    否則回傳「缺少 N 個鍵 […]」「多出 N 個鍵 […]」「形狀不符 N 個 [鍵: 檔案 (…) ≠ 預期 (…)]」
    中有發生的幾項；`limit` 限制每項列出的鍵數（None 表示全部列出）。
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: 檔案 {tuple(found[k])} ≠ 預期 {tuple(expected[k])}"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"缺少 {len(missing)} 個鍵 {_listed(missing, limit)}")
    if unexpected:
        parts.append(f"多出 {len(unexpected)} 個鍵 {_listed(unexpected, limit)}")
    if mismatched:
        parts.append(f"形狀不符 {len(mismatched)} 個 {_listed(mismatched, limit)}")
    return parts
