"""邏輯分片規則：模型、檢查點與訓練共用的分片原語（位於 models 層，不依賴訓練）。

模型參數只帶邏輯軸名稱（例如 `("embed", "mlp")`）；本模組以規則表把邏輯軸
對應到網格軸 `(data, fsdp, tensor)`，得到 `NamedSharding`。某一維無法被對應的
網格軸大小整除時，該維改為複製（不分片），讓小模型也能放在大網格上。
建立網格的 `make_mesh` 在 `speakllm_jax.training.sharding`。
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from speakllm_jax.models.axis_rules import DEFAULT_RULES, MESH_AXES, rules_from_config

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "rules_from_config",
]  # 規則表本身在 axis_rules（不匯入 JAX）

Rules = Sequence[tuple[str, Any]]
_ACTIVE: list[tuple[tuple[str, Any], ...]] = []


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """在此範圍內，未明確給 `rules` 的分片函式（含模型內的活化約束）改用這份規則表。"""
    _ACTIVE.append(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_rules() -> tuple[tuple[str, Any], ...]:
    """目前的規則表：`use_rules` 設定的，否則 `DEFAULT_RULES`。"""
    return _ACTIVE[-1] if _ACTIVE else DEFAULT_RULES


def _axis_size(mesh: Mesh, mesh_axes: Any) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Rules | None = None,
) -> PartitionSpec:
    """把一組邏輯軸名稱轉成 `PartitionSpec`。

    同一網格軸不會被用兩次；不能整除的維度改為複製。
    """
    if not names:
        return PartitionSpec()
    table = dict(active_rules() if rules is None else rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = _axis_size(mesh, axes) if axes else 1
        if not axes or size == 1 or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _names_of(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(
    state: nnx.State,
    mesh: Mesh,
    rules: Rules | None = None,
) -> Any:
    """回傳與 `state` 同結構的 `NamedSharding` 樹（值可為陣列或 ShapeDtypeStruct）。"""

    def one(var: Any) -> Any:
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            names = _names_of(var)
            spec = logical_to_spec(names, getattr(value, "shape", None), mesh, rules)
            return var.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def activation_spec(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules | None = None,
) -> NamedSharding:
    """活化值（例如批次 `("batch", "length")`）的 `NamedSharding`。"""
    return NamedSharding(mesh, logical_to_spec(names, None, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """把已存在的模型參數依規則放到網格上（原地更新並回傳模型）。"""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    new_state = jax.tree.map(
        lambda x, s: jax.device_put(x, s),
        nnx.to_pure_dict(state),
        nnx.to_pure_dict(shardings),
    )
    nnx.replace_by_pure_dict(state, new_state)
    nnx.update(model, state)
    return model
