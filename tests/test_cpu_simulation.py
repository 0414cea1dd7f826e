"""執行環境的設定：匯入套件沒有副作用；入口呼叫的 `configure_cpu_simulation()` 才關閉立即分片、
在模擬多裝置且使用者沒自己設定時放大 XLA CPU 執行緒池。"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from speakllm_jax.cpu_simulation import (
    EAGER_SHARDING_ENV,
    configure_cpu_simulation,
    widen_cpu_thread_pool,
)

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_widen_only_when_simulating_and_unset() -> None:
    env = {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"}
    assert widen_cpu_thread_pool(env) == 16 and env["PJRT_NPROC"] == "16"
    assert widen_cpu_thread_pool({"XLA_FLAGS": "--foo"}) is None
    mine = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "4"}
    assert widen_cpu_thread_pool(mine) is None and mine["PJRT_NPROC"] == "4"


def test_configure_reports_what_it_changed() -> None:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert configure_cpu_simulation(env) == {EAGER_SHARDING_ENV: "false", "PJRT_NPROC": "4"}
    assert configure_cpu_simulation(env) == {}  # 第二次沒有東西要改


def test_importing_the_package_changes_nothing() -> None:
    # 新程序：匯入套件與不需要 JAX 的子模組前後，os.environ 完全相同，也沒有載入 JAX／Flax。
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import speakllm_jax, speakllm_jax.cli, speakllm_jax.config, speakllm_jax.labels\n"
        "import speakllm_jax.cpu_simulation\n"
        "changed = sorted(k for k in set(before) | set(os.environ)"
        " if before.get(k) != os.environ.get(k))\n"
        "loaded = sorted(m for m in ('jax', 'flax', 'torch') if m in sys.modules)\n"
        "print(json.dumps([changed, loaded]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", EAGER_SHARDING_ENV)}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    assert json.loads(_fresh(code, env)) == [[], []]


def test_jax_training_path_imports_no_torch() -> None:
    # 訓練、檢查點（含 CosyVoice2 talker 的載入）與模型在新程序中匯入後，sys.modules 沒有 torch。
    code = (
        "import sys\n"
        "import speakllm_jax.training, speakllm_jax.training.loop, speakllm_jax.training.tasks\n"
        "import speakllm_jax.checkpoints.cosyvoice2_llm, speakllm_jax.checkpoints.hf\n"
        "import speakllm_jax.eval.evaluate\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')) or 'none')\n"
    )
    assert _fresh(code) == "none"


def test_pool_really_widened_in_a_fresh_process() -> None:
    # 新程序：入口呼叫設定後跑一個 4 裝置的程式，XLA 的 Eigen 執行緒數應為 8（2 × 4）。
    code = (
        "import os\n"
        "from speakllm_jax.cpu_simulation import configure_cpu_simulation\n"
        "configure_cpu_simulation()\n"
        "import jax, jax.numpy as jnp\n"
        "from flax import nnx\n"
        "assert not nnx.using_eager_sharding()\n"
        "m = jax.make_mesh((4,), ('d',))\n"
        "s = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec('d'))\n"
        "x = jax.device_put(jnp.ones((4, 8)), s)\n"
        "jax.jit(lambda a: a.sum())(x).block_until_ready()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
        "print(sum(n.startswith('tf_XLAEigen') for n in names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    assert int(_fresh(code, env)) == 8
