"""LoRA：在凍結的線性層旁加上低秩更新 `y = xW + b + (α/r)·(xA)B`。

`LoRALinear` 是 `nnx.Linear` 的子類別，基底參數路徑（`kernel`、`bias`）不變，所以 Hugging Face
鍵對應照常適用；新增的 `lora_a [in, r]`（常態初始化）與 `lora_b [r, out]`（零初始化，訓練開始時
輸出與原模型相同）。訓練設定以 `trainable` 選 `.*lora_[ab]` 只訓練低秩部分。
`merge_lora(model)` 把 `(α/r)·AB` 併入 `kernel` 並把 `lora_b` 歸零（匯出前使用），結果與未合併
的前向相同。
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.layers import Initializer, linear_inits, partitioned


class LoRALinear(nnx.Linear):
    """帶 LoRA 旁路的線性層。"""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        rank: int,
        alpha: float,
        kernel_init: Initializer = nnx.initializers.normal(0.02),
        rngs: nnx.Rngs,
        **linear_kw: Any,
    ) -> None:
        """`linear_kw`（`use_bias`、`dtype`、`param_dtype`）原樣交給 `nnx.Linear`。"""
        if rank <= 0:
            raise ValueError(f"LoRA rank 必須為正，收到 {rank}")
        super().__init__(
            in_features, out_features, rngs=rngs, **linear_inits(axes, kernel_init), **linear_kw
        )
        param_dtype = self.param_dtype
        self.lora_scale = float(alpha) / float(rank)
        a_init = partitioned(nnx.initializers.normal(1.0 / rank), (axes[0], None))
        b_init = partitioned(nnx.initializers.zeros_init(), (None, axes[1]))
        self.lora_a = nnx.Param(a_init(rngs.params(), (in_features, rank), param_dtype))
        self.lora_b = nnx.Param(b_init(rngs.params(), (rank, out_features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        return y + (x.astype(self.dtype) @ a @ b) * jnp.asarray(self.lora_scale, self.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """把模型中所有 `LoRALinear` 的低秩更新併入基底權重（就地），回傳模型。

    堆疊層的參數多一個前綴層軸：`A [L, in, r]`、`B [L, r, out]`，以批次矩陣乘處理。
    """
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear):
            a = module.lora_a[...].astype(jnp.float32)
            b = module.lora_b[...].astype(jnp.float32)
            delta = jnp.matmul(a, b) * module.lora_scale
            k = module.kernel[...]
            module.kernel[...] = (k.astype(jnp.float32) + delta).astype(k.dtype)
            module.lora_b[...] = jnp.zeros_like(module.lora_b[...])
    return model


def lora_param_count(model: nnx.Module) -> int:
    """LoRA 參數總數。"""
    total = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRALinear):
            total += module.lora_a[...].size + module.lora_b[...].size
    return int(total)
