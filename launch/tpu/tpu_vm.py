"""TPU VM 上的訓練：建立、複製專案、安裝、在所有工作機上訓練、看紀錄、刪除。

python launch/tpu/tpu_vm.py {create,copy,setup,train,logs,delete,all} --name N --zone Z \\
    --accelerator-type v5p-64 --version v2-alpha-tpuv5 [--queued] [--spot] [--dry-run] \\
    -- --config phase0 --config.preset=full --workdir gs://bucket/run

`--` 之後的參數原樣交給每個工作機上的 `launch/train.py`。`--dry-run` 只印出 gcloud 指令
（每行一個，已引號化），什麼都不執行。指令的組法在 `speakllm_jax.training.tpu_commands`。
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from speakllm_jax.cli import ArgumentParser, UserError, run_cli  # noqa: E402
from speakllm_jax.training.tpu_commands import (  # noqa: E402
    ACTIONS,
    GcloudNotFound,
    TpuSpec,
    format_commands,
    plan_commands,
    run_commands,
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    doc = __doc__ or ""
    parser = ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "action", choices=ACTIONS, help="要做的步驟；all = 建立→複製→安裝→訓練→紀錄"
    )
    parser.add_argument("--name", required=True, help="TPU（或排隊資源）名稱")
    parser.add_argument("--zone", required=True, help="例如 us-east5-a")
    parser.add_argument("--accelerator-type", default="v5p-8", help="例如 v5p-64、v4-32、v6e-16")
    parser.add_argument(
        "--version", default="v2-alpha-tpuv5", help="TPU 軟體映像（runtime version）"
    )
    parser.add_argument("--project", default="", help="GCP 專案（預設為 gcloud 的目前專案）")
    parser.add_argument("--queued", action="store_true", help="以排隊資源（queued-resources）建立")
    parser.add_argument("--spot", action="store_true", help="使用 Spot（可被搶佔）容量")
    parser.add_argument("--repo", default=str(REPO), help="要複製的本機專案資料夾")
    parser.add_argument(
        "--remote-dir", default="", help="工作機上的專案資料夾名（預設同本機資料夾名）"
    )
    parser.add_argument(
        "--setup-extra",
        default='python -m pip install -q -U "jax[tpu]"',
        help="setup.sh 之後在工作機上執行的指令（空字串表示不執行）",
    )
    parser.add_argument("--log-worker", default="0", help="logs 追蹤哪一台工作機")
    parser.add_argument("--delete-after", action="store_true", help="all 結束後刪除 TPU")
    parser.add_argument("--dry-run", action="store_true", help="只印出 gcloud 指令，不執行")
    args = parser.parse_args(argv)

    try:
        spec = TpuSpec(
            name=args.name,
            zone=args.zone,
            accelerator_type=args.accelerator_type,
            version=args.version,
            project=args.project,
            queued=args.queued,
            spot=args.spot,
            repo=args.repo,
            remote_dir=args.remote_dir,
            train_args=train_args,
            setup_extra=args.setup_extra,
            log_worker=args.log_worker,
        )
        commands = plan_commands(args.action, spec, delete_after=args.delete_after)
    except ValueError as err:
        parser.error(str(err))
    if args.dry_run:
        print(format_commands(commands))
        return 0
    try:
        run_commands(commands, spec)
    except GcloudNotFound as err:
        raise UserError(str(err)) from err
    except subprocess.CalledProcessError as err:
        print(f"錯誤：指令失敗（結束碼 {err.returncode}）：{err.cmd}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
