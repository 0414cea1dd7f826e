"""裝置網格。邏輯軸到網格軸的規則與分片原語在 `speakllm_jax.models.sharding`。"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from speakllm_jax.models.sharding import MESH_AXES


def make_mesh(
    shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """依 `{"data": d, "fsdp": f, "tensor": t}` 建立網格。

    某一軸寫 -1 時取用剩下的所有裝置；未給的軸大小為 1。
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"網格軸名稱 {sorted(unknown)} 不在 {MESH_AXES} 之中")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("網格設定中只能有一個軸為 -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} 個裝置無法整除其餘網格軸的乘積 {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total != len(devices):
        if total > len(devices):
            raise ValueError(
                f"網格 {dict(zip(MESH_AXES, sizes))} 需要 {total} 個裝置，只有 {len(devices)} 個"
            )
        devices = devices[:total]
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)
