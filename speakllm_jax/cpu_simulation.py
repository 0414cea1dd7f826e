"""執行環境的設定（JAX／Flax），由入口明確呼叫；匯入本套件本身不改任何東西。

`configure_cpu_simulation()` 在 JAX 建立後端之前呼叫（各 CLI 的 `main`、測試的 conftest）：

- 參數只帶邏輯軸名稱的中繼資料，建立時不立即分片（Flax 的 eager sharding 關閉）；分片一律由
  `speakllm_jax.models.sharding` 依規則表對應到網格。Flax 尚未匯入時只設它匯入時讀取的環境變數
  `FLAX_ALWAYS_SHARD_VARIABLE`，不在此匯入 Flax（服務端也能呼叫）；已匯入時直接設定。
- 以 `--xla_force_host_platform_device_count=N` 模擬多裝置時放大 XLA CPU 執行緒池。池預設與模擬
  裝置數相同；集體通訊在 rendezvous 等待時會占住池中的執行緒，等待中的裝置一多，剩下的裝置就
  排不到執行緒，整個程式永久卡死（2 核機器高負載時常見，見 docs/training_schedule.md）。
  把池放大到裝置數的兩倍（PJRT 讀 `PJRT_NPROC`）即可避免。
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import MutableMapping

EAGER_SHARDING_ENV = "FLAX_ALWAYS_SHARD_VARIABLE"


def widen_cpu_thread_pool(environ: MutableMapping[str, str] | None = None) -> int | None:
    """有模擬裝置且使用者沒有自己設定 `PJRT_NPROC`／`NPROC` 時，設 `PJRT_NPROC = 2 × 裝置數`。

    回傳設定的值（沒有動作時為 None）。
    """
    env = os.environ if environ is None else environ
    m = re.search(r"xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    if not m or "PJRT_NPROC" in env or "NPROC" in env:
        return None
    n = 2 * int(m.group(1))
    env["PJRT_NPROC"] = str(n)
    return n


def configure_cpu_simulation(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """入口呼叫一次：關閉 Flax 的立即分片、模擬多裝置時放大 CPU 執行緒池。回傳改動的環境變數。"""
    env = os.environ if environ is None else environ
    before = dict(env)
    if "flax" in sys.modules and environ is None:
        # 只在 Flax 已由呼叫端載入時才取用它，所以這裡不會帶入 Flax／JAX。
        importlib.import_module("flax.nnx").use_eager_sharding(False)
    env[EAGER_SHARDING_ENV] = "false"
    widen_cpu_thread_pool(env)
    return {k: v for k, v in env.items() if before.get(k) != v}
