"""訓練入口：`python launch/train.py --config phase2 --workdir DIR [--config.a.b=值 ...]`。

同一個 workdir 再跑一次即從最新的完整檢查點恢復（已訓練完成時只印出摘要）。所有邏輯在
`speakllm_jax.training.loop`；設定或參數錯誤印一行 `錯誤：…`、結束碼 2（`--debug` 顯示 traceback）。
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.config import load_config  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.training.config_io import check_train_config  # noqa: E402


def _logged_losses(workdir: Path) -> list[float]:
    """由 `metrics.jsonl` 讀回每步損失（重跑已完成的 workdir 時用來摘要）。"""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row and row.get("finite", 1.0) > 0:
            by_step[int(row["step"])] = float(row["loss"])
    return [by_step[s] for s in sorted(by_step)]


def print_train_summary(result: Any, workdir: Path, steps: int) -> None:
    """訓練結尾（或重跑已完成的 workdir 時）的摘要：寫了什麼、TensorBoard 指令與下一步。"""
    losses = result.losses
    if result.resumed_from is None or result.final_step > result.resumed_from:
        title = f"完成：第 {result.final_step} 步"
    else:
        title = f"已訓練完成（第 {result.final_step} 步，train.steps={steps}），未再訓練"
        losses = _logged_losses(workdir)
    if result.preempted:
        title = f"已中止並存檔：第 {result.final_step} 步（同一指令重跑即恢復）"
    if losses:
        title += f"，損失 {losses[0]:.4f} → {losses[-1]:.4f}"
    written: list[tuple[str, Any]] = [
        ("執行資料夾", workdir),
        ("設定", workdir / "config.json"),
        ("檢查點", workdir / "checkpoints"),
        ("指標", workdir / "metrics.jsonl"),
        ("損失曲線", workdir / "loss_curve.png"),
    ]
    written = [(label, path) for label, path in written if path.exists()]
    tb = workdir / "tensorboard"
    if tb.is_dir():
        written.append(("TensorBoard", f"tensorboard --logdir {shlex.quote(str(tb))}"))
    quoted = shlex.quote(str(workdir))
    print_summary(
        title,
        written,
        [
            f"python launch/evaluate.py --workdir {quoted}",
            f"python -m export.to_torch --checkpoint {quoted} --out exported/{workdir.name}",
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="phase0",
        help="階段名稱（phase0…phase3）或設定檔路徑，可加 :preset=full",
    )
    parser.add_argument("--workdir", default="", help="執行資料夾（預設 runs/<階段>）")
    parser.add_argument("--no_progress", action="store_true", help="不顯示進度條")
    args, overrides = parser.parse_known_args(argv)
    configure_cpu_simulation()
    cfg = load_config(args.config, overrides)
    check_train_config(cfg)
    workdir = Path(args.workdir or Path("runs") / cfg.phase)

    # 設定無誤後才匯入 JAX 與訓練迴圈，錯誤訊息不必等待編譯。
    from speakllm_jax.training.loop import TooManyBadSteps, train

    try:
        result = train(cfg, workdir, progress=not args.no_progress)
    except TooManyBadSteps as err:
        print(f"錯誤：{err}", file=sys.stderr)
        return 3
    print_train_summary(result, workdir, int(cfg.train.steps))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
