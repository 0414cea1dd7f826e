"""模擬多裝置時的 XLA CPU 執行緒池設定：只在有模擬裝置、且使用者沒自己設定時才放大。"""

from __future__ import annotations

import os
import subprocess
import sys

from speakllm_jax.cpu_simulation import widen_cpu_thread_pool


def test_widen_only_when_simulating_and_unset() -> None:
    env = {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"}
    assert widen_cpu_thread_pool(env) == 16 and env["PJRT_NPROC"] == "16"
    assert widen_cpu_thread_pool({"XLA_FLAGS": "--foo"}) is None
    mine = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "4"}
    assert widen_cpu_thread_pool(mine) is None and mine["PJRT_NPROC"] == "4"


def test_pool_really_widened_in_a_fresh_process() -> None:
    # 新程序：匯入套件後跑一個 4 裝置的程式，XLA 的 Eigen 執行緒數應為 8（2 × 4）。
    code = (
        "import os, speakllm_jax, jax, jax.numpy as jnp\n"
        "m = jax.make_mesh((4,), ('d',))\n"
        "s = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec('d'))\n"
        "x = jax.device_put(jnp.ones((4, 8)), s)\n"
        "jax.jit(lambda a: a.sum())(x).block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
        "print(sum(n.startswith('tf_XLAEigen') for n in names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == 8
