"""批次綱要：每個欄位的名稱、形狀（以具名維度表示，不含批次軸）、型別、邏輯軸與補齊值。

一個任務的綱要只宣告一次（全雙工：`data.duplex.DUPLEX_BATCH`；ASR：`data.batching.ASR_BATCH`），
資料管線依它補齊與挑欄位，任務依它給出分片用的邏輯軸，規劃器依它建立抽象輸入
（`shapes(batch, sizes)`，`sizes` 把具名維度換成數字，例如 frames=384）。
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Field:
    """一個批次欄位；`pad` 是補齊值，字串表示由呼叫端提供的具名值（例如 "pad_id"）。"""

    name: str
    dims: tuple[str, ...]
    dtype: str
    axes: tuple[str | None, ...] | None = None
    pad: float | int | bool | str = 0

    def __post_init__(self) -> None:
        if self.axes is not None and len(self.axes) != len(self.dims):
            raise ValueError(f"{self.name}: axes {self.axes} 與 dims {self.dims} 長度不同")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """不含批次軸的形狀；`sizes` 缺某個維度時拋出 KeyError。"""
        try:
            return tuple(int(sizes[d]) for d in self.dims)
        except KeyError as err:
            raise KeyError(f"{self.name}: 缺少維度 {err.args[0]!r} 的大小") from err

    def pad_value(self, values: Mapping[str, Any] | None = None) -> Any:
        if isinstance(self.pad, str):
            return (values or {})[self.pad]
        return self.pad


class BatchSchema:
    """有序的欄位集合。"""

    def __init__(self, fields: Iterable[Field]) -> None:
        self.fields: tuple[Field, ...] = tuple(fields)
        self._by_name = {f.name: f for f in self.fields}
        if len(self._by_name) != len(self.fields):
            raise ValueError("批次綱要有重複的欄位名稱")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.fields)

    def subset(self, names: Iterable[str]) -> BatchSchema:
        """只留 `names`（依給定順序）；未知名稱拋出 KeyError。"""
        names = tuple(names)
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise KeyError(f"批次綱要沒有欄位 {unknown}；有：{list(self.names)}")
        return BatchSchema(self._by_name[n] for n in names)

    def axes(self) -> dict[str, tuple[str | None, ...]]:
        """每個欄位的邏輯軸（第 0 軸為 "batch"），供 `batch_shardings` 用。"""
        return {
            f.name: ("batch",) + (f.axes if f.axes is not None else (None,) * len(f.dims))
            for f in self.fields
        }

    def shapes(self, batch: int, sizes: Mapping[str, int]) -> dict[str, tuple[tuple, np.dtype]]:
        """{欄位: ((batch, *形狀), dtype)}。"""
        return {f.name: ((int(batch),) + f.shape(sizes), f.np_dtype) for f in self.fields}

    def zeros(self, batch: int, sizes: Mapping[str, int], names: Iterable[str]) -> dict:
        """`names` 各欄位的全零陣列（含批次軸）。"""
        return {n: np.zeros((int(batch),) + self[n].shape(sizes), self[n].np_dtype) for n in names}

    def select(self, ex: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """由一筆樣本取出綱要欄位（型別不同時轉型；維度數不合時拋出 ValueError）。"""
        out = {}
        for f in self.fields:
            v = ex[f.name]
            if not (isinstance(v, np.ndarray | np.generic) and v.dtype == f.np_dtype):
                v = np.asarray(v, f.np_dtype)
            if v.ndim != len(f.dims):
                raise ValueError(f"{f.name}: 應有 {len(f.dims)} 維 {f.dims}，得到形狀 {v.shape}")
            out[f.name] = v
        return out
