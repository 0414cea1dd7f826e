"""所有模型共用的基本層與慣例。

慣例：
- 每個參數都以 `nnx.with_partitioning` 標上邏輯軸名稱（見 `speakllm_jax.models.axis_rules.AXES`），
  由 `speakllm_jax.models.sharding` 的規則表對應到網格軸。
- `dtype` 是計算精度，`param_dtype` 是參數（主權重）精度。
- 堆疊的層以 `nnx.vmap` 建立、以 `nnx.scan` 前向；其前綴軸名為 `"layers"`。
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.sharding import logical_to_spec

Initializer = Callable[..., jax.Array]


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """回傳帶有邏輯軸名稱中繼資料的初始化函式。"""
    return nnx.with_partitioning(init, tuple(axes))


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    kernel_init: Initializer = nnx.initializers.normal(0.02),
) -> nnx.Linear:
    """建立帶邏輯軸名稱的全連接層；偏置的軸名取輸出軸。"""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **linear_inits(axes, kernel_init),
    )


def linear_inits(
    axes: tuple[str | None, str | None], kernel_init: Initializer = nnx.initializers.normal(0.02)
) -> dict[str, Initializer]:
    """線性層（含 LoRA 的基底）的核與偏置初始化，帶邏輯軸名稱；偏置為 0，軸名取輸出軸。"""
    return {
        "kernel_init": partitioned(kernel_init, axes),
        "bias_init": partitioned(nnx.initializers.zeros_init(), (axes[1],)),
    }


def embedding(
    num: int,
    features: int,
    axes: tuple[str | None, str | None] = ("vocab", "embed"),
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Embed:
    """帶邏輯軸名稱的嵌入表（常態分佈 0.02 初始化）。"""
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(0.02), axes),
        rngs=rngs,
    )


class _Norm(nnx.Module):
    """正規化層的共同參數：`weight`（以及 `use_bias` 時的 `bias`），以 fp32 計算。"""

    default_eps = 1e-6
    use_bias = False

    def __init__(
        self,
        dim: int,
        *,
        eps: float | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ) -> None:
        self.eps = self.default_eps if eps is None else eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype), out_sharding=("norm",))
        if self.use_bias:
            self.bias = nnx.Param(jnp.zeros((dim,), dtype=param_dtype), out_sharding=("norm",))


class RMSNorm(_Norm):
    """均方根正規化（Qwen2 形式：以 fp32 計算，乘上權重後轉回計算精度；預設 eps 1e-6）。"""

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(self.dtype)


class LayerNorm(_Norm):
    """帶權重與偏置的層正規化（Whisper 使用），以 fp32 計算；預設 eps 1e-5。"""

    default_eps = 1e-5
    use_bias = True

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str) -> Any:
    """依設定字串取得 `jax.checkpoint` 的保存策略；未知名稱明確報錯。"""
    if name not in REMAT_POLICIES:
        raise ValueError(f"未知的 remat 策略 {name!r}；可用：{sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def maybe_remat(fn: Callable, policy_name: str) -> Callable:
    """依策略包上 `nnx.remat`；策略為 "none" 時原樣回傳。"""
    if policy_name == "none":
        return fn
    return nnx.remat(fn, policy=remat_policy(policy_name), prevent_cse=False)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """依邏輯軸名稱約束活化值的分片（只在 `jax.set_mesh` 設定了網格時生效）。

    沒有這個約束時，FSDP 網格上 XLA 可能保持權重分片而把整個全域批次的活化值收集到每個
    裝置，記憶體隨全域批次而非每裝置批次成長。規則表為目前的 `models.sharding.active_rules()`。
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(tuple(names), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def count_params(tree: Any) -> int:
    """參數（或任何 pytree、模組）的元素總數；可用於 `nnx.eval_shape` 的抽象模型或狀態。"""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
