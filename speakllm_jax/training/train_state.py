"""訓練狀態與 jit 編譯的訓練步。

模型以 `nnx.split` 拆成三份：圖定義、可訓練參數、其餘（凍結參數與其他變數）。
只有可訓練參數有優化器狀態；凍結部分照常參與前向但沒有梯度。
訓練步是純函式：輸入狀態與批次、輸出新狀態與指標，狀態的緩衝區被捐贈（donate）。
損失或梯度出現 NaN/Inf 時，該步的更新不套用（參數與優化器狀態保持原值），
`bad_steps` 加一，由外層迴圈決定何時停止。
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from speakllm_jax.models.sharding import logical_to_spec, state_shardings
from speakllm_jax.training.tasks.base import Task


@flax.struct.dataclass
class TrainState:
    """可存入檢查點的完整訓練狀態（全部都是陣列）。"""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array


def path_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
    """可訓練參數篩選器：`nnx.Param` 且路徑（以 "/" 連接）符合任一正規表示式。"""
    compiled = [re.compile(p) for p in patterns]

    def keep(path: tuple, value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = "/".join(str(p) for p in path)
        return any(c.fullmatch(name) or c.match(name) for c in compiled)

    return keep


def split_model(model: nnx.Module, patterns: Sequence[str]) -> tuple[nnx.GraphDef, Any, Any]:
    """拆成 (圖定義, 可訓練的純狀態, 其餘的純狀態)。沒有任何可訓練參數時報錯。"""
    graphdef, trainable, rest = nnx.split(model, path_filter(patterns), ...)
    if not jax.tree.leaves(trainable):
        names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))][:20]
        raise ValueError(
            f"設定 trainable={tuple(patterns)} 沒有選到任何參數；模型參數例如：{names}"
        )
    return graphdef, nnx.as_pure(trainable), nnx.as_pure(rest)


def _pure_shardings(var_shardings: Any) -> Any:
    return nnx.as_pure(var_shardings)


def state_sharding_tree(
    abstract_model: nnx.Module,
    patterns: Sequence[str],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> tuple[TrainState, TrainState]:
    """回傳 (抽象狀態, 分片樹)。優化器狀態中與參數同形的部分沿用參數的分片。"""
    graphdef, trainable_v, rest_v = nnx.split(abstract_model, path_filter(patterns), ...)
    p_shard = _pure_shardings(state_shardings(trainable_v, mesh, rules))
    r_shard = _pure_shardings(state_shardings(rest_v, mesh, rules))
    params = nnx.as_pure(trainable_v)
    opt_abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shard = optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_abstract,
        p_shard,
        transform_non_params=lambda _: replicated,
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(
        step=scalar,
        params=params,
        frozen=nnx.as_pure(rest_v),
        opt_state=opt_abstract,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        bad_steps=scalar,
    )
    shardings = TrainState(
        step=replicated,
        params=p_shard,
        frozen=r_shard,
        opt_state=opt_shard,
        rng=replicated,
        bad_steps=replicated,
    )
    del graphdef
    return abstract, shardings


def batch_shardings(
    batch: dict[str, Any],
    mesh: Mesh,
    axes: dict[str, tuple[str | None, ...]],
    rules: Sequence[tuple[str, Any]] | None = None,
) -> dict[str, NamedSharding]:
    """批次各欄位的分片：第 0 軸為 "batch"，其餘依任務給的邏輯軸。"""
    out = {}
    for k, v in batch.items():
        names = axes.get(k, ("batch",) + (None,) * (len(v.shape) - 1))
        out[k] = NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules))
    return out


def make_init_fn(
    task: Task, patterns: Sequence[str], tx: optax.GradientTransformation, seed: int
) -> tuple[Callable[[], TrainState], nnx.GraphDef]:
    """回傳建立初始狀態的函式（供 jit 搭配 out_shardings）與模型圖定義。"""
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    graphdef, _, _ = nnx.split(abstract_model, path_filter(patterns), ...)

    def init() -> TrainState:
        model = task.build_model(nnx.Rngs(seed))
        _, params, rest = split_model(model, patterns)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=rest,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
            bad_steps=jnp.zeros((), jnp.int32),
        )

    return init, graphdef


def state_from_model(
    model: nnx.Module, patterns: Sequence[str], tx: optax.GradientTransformation, seed: int
) -> TrainState:
    """由已載入權重的模型建立初始狀態（例如載入預訓練 HF 權重之後）。"""
    _, params, rest = split_model(model, patterns)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=rest,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def _microbatches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum:
            raise ValueError(f"批次大小 {x.shape[0]} 不能被梯度累積步數 {accum} 整除")
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    task: Task,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """建立（尚未 jit 的）訓練步。梯度累積以 `lax.scan` 走過微批次，總和後再除以總權重。"""

    def loss_sum(params: Any, frozen: Any, batch: dict, rng: jax.Array) -> tuple:
        model = nnx.merge(graphdef, params, frozen)
        total, weight, metrics = task.loss(model, batch, rng)
        return total, (weight, metrics)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro = _microbatches(batch, grad_accum)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry: tuple, xs: tuple) -> tuple:
            g_acc, l_acc, w_acc, m_acc = carry
            mb, i = xs
            (total, (weight, metrics)), g = grad_fn(
                state.params, state.frozen, mb, jax.random.fold_in(key, i)
            )
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            m_acc = {k: m_acc[k] + metrics[k] for k in m_acc}
            return (g_acc, l_acc + total, w_acc + weight, m_acc), None

        first = jax.tree.map(lambda x: x[0], micro)
        _, (_, metric_shape) = jax.eval_shape(loss_sum, state.params, state.frozen, first, key)
        m0 = {k: jnp.zeros(v.shape, v.dtype) for k, v in metric_shape.items()}
        init = (zeros, jnp.zeros(()), jnp.zeros(()), m0)
        (g_sum, l_sum, w_sum, m_sum), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
        denom = jnp.maximum(w_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = l_sum / denom
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            bad_steps=state.bad_steps + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "weight": w_sum,
            "finite": finite,
        }
        metrics.update({k: v / denom for k, v in m_sum.items()})
        return new_state, metrics

    return step


def make_eval_step(task: Task, graphdef: nnx.GraphDef) -> Callable:
    """評估步：回傳 (損失總和, 權重, 指標總和)，由呼叫端在多個批次上加總。"""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state.params, state.frozen)
        key = jax.random.wrap_key_data(state.rng)
        total, weight, metrics = task.loss(model, batch, key)
        return {"loss_sum": total, "weight": weight, **metrics}

    return step


def merged_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """由訓練狀態組回 NNX 模型（匯出、評估用）。"""
    return nnx.merge(graphdef, state.params, state.frozen)
