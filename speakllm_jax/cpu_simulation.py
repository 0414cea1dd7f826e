"""在 CPU 上以 `--xla_force_host_platform_device_count=N` 模擬多裝置時的執行緒池設定。

XLA CPU 的執行緒池預設與模擬裝置數相同。集體通訊在 rendezvous 等待時會占住池中的執行緒；
等待中的裝置一多，剩下的裝置就排不到執行緒，整個程式永久卡死（2 核機器高負載時常見，
見 docs/training_schedule.md）。把池放大到裝置數的兩倍（PJRT 讀 `PJRT_NPROC`）即可避免。
必須在 JAX 建立 CPU 後端之前呼叫（`import speakllm_jax` 時自動呼叫）。
"""

from __future__ import annotations

import os
import re


def widen_cpu_thread_pool(environ: dict | None = None) -> int | None:
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
