"""TPU VM 的 gcloud 指令：建立（直接或排隊資源）、複製專案、安裝、在所有工作機上訓練、看紀錄、刪除。

本模組只「組出」指令（每個指令是一個 argv 串列），由 `launch/tpu/tpu_vm.py` 印出
（`--dry-run`，以 `shlex.join` 引號化）或依序執行。訓練指令在每個工作機上以 `nohup`
於背景執行，輸出寫到家目錄的紀錄檔，程序編號寫到 `.pid` 檔，讓 `logs` 能在訓練結束時停止追蹤。

多主機：JAX 在 TPU VM 上以 `jax.distributed.initialize()` 自行偵測各主機，而
`speakllm_jax.training.distributed.maybe_initialize` 以環境變數 `TPU_WORKER_HOSTNAMES`
判斷是否在多主機 pod 上；因此訓練指令先由中繼資料伺服器的 `worker-network-endpoints`
設好這個變數（單主機時只有一個位址，不會初始化分散式）。
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STEPS = ("create", "copy", "setup", "train", "logs", "delete")
ACTIONS = (*STEPS, "all")

LOG_FILE = "speakllm_train.log"
PID_FILE = "speakllm_train.pid"
_METADATA = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "worker-network-endpoints"
)


class GcloudNotFound(RuntimeError):
    """找不到 gcloud 執行檔。"""


@dataclass
class TpuSpec:
    """一台 TPU VM（或 pod 切片）與要在上面執行的訓練。"""

    name: str
    zone: str
    accelerator_type: str = "v5p-8"
    version: str = "v2-alpha-tpuv5"
    project: str = ""
    queued: bool = False
    spot: bool = False
    repo: str = "."
    remote_dir: str = ""
    train_args: list[str] = field(default_factory=list)
    setup_extra: str = 'python -m pip install -q -U "jax[tpu]"'
    log_worker: str = "0"

    def __post_init__(self) -> None:
        for key in ("name", "zone", "accelerator_type", "version"):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"TPU 設定的 --{key.replace('_', '-')} 不可為空")
        if not self.remote_dir:
            self.remote_dir = Path(self.repo).resolve().name

    def _common(self) -> list[str]:
        out = [f"--zone={self.zone}"]
        if self.project:
            out.append(f"--project={self.project}")
        return out


def create_commands(spec: TpuSpec) -> list[list[str]]:
    """建立 TPU：直接建立 VM，或建立排隊資源（`--queued`）後查詢其狀態。"""
    if spec.queued:
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            spec.name,
            f"--node-id={spec.name}",
            f"--accelerator-type={spec.accelerator_type}",
            f"--runtime-version={spec.version}",
            *spec._common(),
        ]
        if spec.spot:
            cmd.append("--spot")
        return [cmd, wait_command(spec)]
    cmd = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        spec.name,
        f"--accelerator-type={spec.accelerator_type}",
        f"--version={spec.version}",
        *spec._common(),
    ]
    if spec.spot:
        cmd.append("--spot")
    return [cmd]


def wait_command(spec: TpuSpec) -> list[str]:
    """排隊資源的狀態查詢（執行時重複呼叫直到 ACTIVE）。"""
    return [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        spec.name,
        "--format=value(state.state)",
        *spec._common(),
    ]


def ssh_command(spec: TpuSpec, remote: str, worker: str = "all") -> list[str]:
    """在工作機上執行一段 shell 指令（`--worker=all` 為所有主機）。"""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        spec.name,
        f"--worker={worker}",
        f"--command={remote}",
        *spec._common(),
    ]


def copy_commands(spec: TpuSpec) -> list[list[str]]:
    """把本機專案資料夾遞迴複製到每個工作機的家目錄（成為 `~/<remote_dir>`）。"""
    repo = Path(spec.repo).resolve()
    if repo.name != spec.remote_dir:
        raise ValueError(
            f"scp 以來源資料夾名稱 {repo.name!r} 建立遠端資料夾；--remote-dir 必須相同"
        )
    return [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            str(repo),
            f"{spec.name}:~/",
            "--worker=all",
            "--recurse",
            *spec._common(),
        ]
    ]


def setup_commands(spec: TpuSpec) -> list[list[str]]:
    """在所有工作機上執行 `launch/setup.sh`，再安裝 TPU 版 JAX。"""
    remote = f"cd ~/{shlex.quote(spec.remote_dir)} && bash launch/setup.sh"
    if spec.setup_extra:
        remote += f" && {spec.setup_extra}"
    return [ssh_command(spec, remote)]


def train_remote(spec: TpuSpec) -> str:
    """每個工作機上執行的 shell 指令：設定主機清單、背景執行 `launch/train.py`。"""
    argv = ["python", "launch/train.py", *spec.train_args]
    if "--no_progress" not in argv:
        argv.append("--no_progress")
    hosts = (
        f"export TPU_WORKER_HOSTNAMES=$(curl -sf -H Metadata-Flavor:Google {_METADATA} "
        "| tr ',' '\\n' | cut -d: -f3 | paste -sd, -)"
    )
    # 只有 python 在背景執行且標準輸入輸出都已轉向，ssh 才會立即返回。
    return (
        f"cd ~/{shlex.quote(spec.remote_dir)} && {hosts} && "
        f"{{ nohup {shlex.join(argv)} > ~/{LOG_FILE} 2>&1 < /dev/null & "
        f"echo $! > ~/{PID_FILE}; }}"
    )


def train_commands(spec: TpuSpec) -> list[list[str]]:
    """在所有工作機上同時啟動訓練（各主機同一指令，由 JAX 分散式接成一個作業）。"""
    return [ssh_command(spec, train_remote(spec))]


def logs_commands(spec: TpuSpec) -> list[list[str]]:
    """追蹤一台工作機的訓練紀錄，訓練程序結束時停止。"""
    remote = f"tail --pid=$(cat ~/{PID_FILE}) -n +1 -f ~/{LOG_FILE}"
    return [ssh_command(spec, remote, worker=spec.log_worker)]


def delete_commands(spec: TpuSpec) -> list[list[str]]:
    """刪除 TPU（排隊資源連同其節點）。"""
    if spec.queued:
        return [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                spec.name,
                "--force",
                "--quiet",
                *spec._common(),
            ]
        ]
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", spec.name, "--quiet", *spec._common()]
    ]


_BUILDERS: dict[str, Callable[[TpuSpec], list[list[str]]]] = {
    "create": create_commands,
    "copy": copy_commands,
    "setup": setup_commands,
    "train": train_commands,
    "logs": logs_commands,
    "delete": delete_commands,
}


def plan_commands(action: str, spec: TpuSpec, delete_after: bool = False) -> list[list[str]]:
    """某個動作的全部指令；`all` = 建立、複製、安裝、訓練、追蹤紀錄（可選最後刪除）。"""
    if action not in ACTIONS:
        raise ValueError(f"未知的動作 {action!r}；可用：{ACTIONS}")
    steps = ["create", "copy", "setup", "train", "logs"] if action == "all" else [action]
    if action == "all" and delete_after:
        steps.append("delete")
    if "train" in steps and not spec.train_args:
        raise ValueError("train 需要 `--` 之後的 launch/train.py 參數，例如 -- --config phase0 ...")
    out: list[list[str]] = []
    for s in steps:
        out.extend(_BUILDERS[s](spec))
    return out


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """每行一個指令，以 `shlex.join` 引號化（可直接貼到 shell）。"""
    return "\n".join(shlex.join(list(c)) for c in commands)


def require_gcloud() -> str:
    """回傳 gcloud 的路徑；找不到時丟出說明清楚的錯誤。"""
    path = shutil.which("gcloud")
    if path is None:
        raise GcloudNotFound(
            "找不到 gcloud：請安裝 Google Cloud SDK 並執行 `gcloud auth login`，"
            "或加上 --dry-run 只印出指令"
        )
    return path


def run_commands(
    commands: Sequence[Sequence[str]],
    spec: TpuSpec,
    *,
    poll_seconds: float = 30.0,
    max_wait_seconds: float = 6 * 3600,
) -> None:
    """依序執行指令；任何一個失敗即停止。排隊資源的狀態查詢會重複到 ACTIVE 為止。"""
    require_gcloud()
    waiter = wait_command(spec)
    for cmd in commands:
        print("+ " + shlex.join(list(cmd)), file=sys.stderr, flush=True)
        if list(cmd) == waiter:
            deadline = time.monotonic() + max_wait_seconds
            while True:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                state = out.stdout.strip()
                print(f"  排隊資源狀態：{state}", file=sys.stderr, flush=True)
                if state == "ACTIVE":
                    break
                if state in ("FAILED", "SUSPENDED"):
                    raise RuntimeError(f"排隊資源 {spec.name} 的狀態為 {state}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"等待排隊資源 {spec.name} 超過 {max_wait_seconds} 秒")
                time.sleep(poll_seconds)
            continue
        subprocess.run(list(cmd), check=True)
