"""訓練紀錄：JSONL 指標檔、TensorBoard 事件檔、選用的 Weights & Biases，與結束時的損失曲線圖。

只有程序 0 寫檔；其他程序的紀錄器什麼都不做。W&B 未安裝或離線時不會中斷訓練。
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax


class MetricsLogger:
    """把每步指標寫到 `workdir/metrics.jsonl`、`workdir/tensorboard/`，結束時畫 `loss_curve.png`。"""

    def __init__(
        self,
        workdir: str | Path,
        tensorboard: bool = True,
        wandb_project: str = "",
        use_wandb: bool = False,
        config: dict[str, Any] | None = None,
    ):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        if tensorboard:
            # 延後匯入：tensorboardX 很重，只在寫 TensorBoard 時需要
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.workdir / "tensorboard"))
        if use_wandb:
            self.wandb = _start_wandb(wandb_project, self.workdir, config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", float(v), int(step))
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))

    def history(self) -> list[dict[str, float]]:
        """讀回 `metrics.jsonl`（恢復訓練時包含先前的紀錄）。"""
        if not self.enabled or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        """畫損失曲線 PNG；沒有資料時不畫。"""
        if not self.enabled:
            return None
        rows = [r for r in self.history() if "loss" in r and r.get("finite", 1.0) > 0]
        if not rows:
            return None
        # 延後匯入：matplotlib 很重，只在畫圖時需要
        import matplotlib

        matplotlib.use("Agg")
        # 延後匯入：matplotlib 很重，只在畫圖時需要
        import matplotlib.pyplot as plt

        # 恢復訓練後同一步可能記錄兩次：取最後一筆。
        by_step = {int(r["step"]): r["loss"] for r in rows}
        steps = sorted(by_step)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(steps, [by_step[s] for s in steps], lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.workdir.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.workdir / "loss_curve.png"
        fig.savefig(out)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(project: str, workdir: Path, config: dict[str, Any]) -> Any:
    try:
        # 延後匯入：wandb 是選用套件
        import wandb
    except ImportError:
        print("wandb 未安裝，略過 Weights & Biases 紀錄。")
        return None
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    try:
        return wandb.init(project=project, dir=str(workdir), config=config, mode=mode)
    except Exception as err:  # noqa: BLE001 - 紀錄失敗不應中斷訓練
        print(f"wandb 無法啟動（{err}），略過。")
        return None
