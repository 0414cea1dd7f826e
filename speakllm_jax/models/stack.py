"""所有模型共用的層堆疊：以 `nnx.vmap` 建立堆疊參數、以 `nnx.scan` 逐層前向。

各層參數的第 0 軸是層（前綴軸名 `"layers"`，分片規則表中為複製），檢查點的鍵對應依此逐層
展開。`scan_layers` 只有一個意思：True 時各層共用一份編譯好的迴圈體（`lax.scan`），False 時
同一份堆疊參數完全展開（`unroll`），參數佈局與檢查點格式不變。`remat` 為
`layers.REMAT_POLICIES` 中的重算策略名稱。
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from speakllm_jax.models.layers import constrain, maybe_remat

# 層與層之間活化值的邏輯軸：批次沿 (data, fsdp) 切，其餘複製。
ACT_AXES = ("batch", "length", None)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """以 `make(rngs)` 建立 `n` 層，參數堆疊在第 0 軸（各層亂數不同）。"""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


def run_layers(
    layers: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    scan: bool = True,
    remat: str = "none",
) -> tuple[Any, Any]:
    """依序對每層執行 `body(layer, carry, x_i) -> (carry, y_i)`。

    `xs` 與輸出的 `y` 以第 0 軸（層）堆疊，例如各層的 KV 快取；其他各層共用的輸入（遮罩、
    RoPE）由 `body` 的閉包取得。`carry` 為陣列時（層間的隱狀態）每層前後依 `ACT_AXES` 約束分片。
    """

    def step(layer: nnx.Module, c: Any, x: Any) -> tuple[Any, Any]:
        if isinstance(c, jax.Array):
            c = constrain(c, ACT_AXES)
        c, y = body(layer, c, x)
        if isinstance(c, jax.Array):
            c = constrain(c, ACT_AXES)
        return c, y

    fn = nnx.scan(
        maybe_remat(step, remat),
        in_axes=(0, nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
        unroll=1 if scan else True,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    return fn(layers, carry, xs)
