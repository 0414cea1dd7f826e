"""網格軸與邏輯軸規則的預設表（純 Python，不匯入 JAX；設定檔 `configs/base.py` 由此取預設值）。

訓練設定的 `logical_axis_rules` 預設為 `DEFAULT_RULES`（MaxText 的 `logical_axis_rules`）；
分片原語在 `speakllm_jax.models.sharding`。
"""

from __future__ import annotations

from typing import Any

# 裝置網格的軸：資料平行、FSDP、張量平行。
MESH_AXES = ("data", "fsdp", "tensor")

# 專案使用的邏輯軸名稱。新增名稱時也要在 sharding 規則表中補上。
AXES = (
    "batch",
    "length",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "norm",
    "conv_in",
    "conv_out",
    "kernel",
    "codebook",
)

# 邏輯軸 → 網格軸（或網格軸的元組、或 None 表示複製）。
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("kernel", None),
    ("codebook", None),
)


def rules_from_config(value: Any) -> tuple[tuple[str, Any], ...]:
    """`config.logical_axis_rules`（元組或 JSON 讀回的串列）→ 規則表；格式不對時 ValueError。

    每條為 `(邏輯軸, 網格軸)`，網格軸為 None、`MESH_AXES` 中的名稱或其元組。
    """
    out = []
    for item in value:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"logical_axis_rules 的每一條須為 (邏輯軸, 網格軸)，收到 {item!r}")
        name, target = item
        if isinstance(target, (list, tuple)):
            target = tuple(target)
        targets = () if target is None else (target,) if isinstance(target, str) else target
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(
                f"logical_axis_rules 的 {name!r} 指向未知的網格軸 {bad}；可用：{MESH_AXES}"
            )
        out.append((name, target))
    return tuple(out)
