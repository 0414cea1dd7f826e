"""多主機啟動：設定或環境變數指出有多個程序時呼叫 `jax.distributed.initialize`。

TPU VM 上不需任何設定（JAX 自行偵測）；CPU 多程序測試以
`coordinator_address=127.0.0.1:port`、`num_processes`、`process_id` 指定，並使用 gloo 集體通訊。
"""

from __future__ import annotations

import os
from typing import Any

import jax

_INITIALIZED = False


def maybe_initialize(dist: Any) -> None:
    """必要時初始化分散式 JAX；重複呼叫無害。"""
    global _INITIALIZED
    if _INITIALIZED:
        return
    address = dist.coordinator_address or os.environ.get("SPEAKLLM_COORDINATOR", "")
    num = int(dist.num_processes or os.environ.get("SPEAKLLM_NUM_PROCESSES", 1))
    pid = int(dist.process_id or os.environ.get("SPEAKLLM_PROCESS_ID", 0))
    on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES")) and "," in os.environ.get(
        "TPU_WORKER_HOSTNAMES", ""
    )
    if num > 1 and address:
        if dist.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        _INITIALIZED = True
    elif on_tpu_pod:
        jax.distributed.initialize()
        _INITIALIZED = True
