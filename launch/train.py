"""訓練入口：`python launch/train.py --config phase2 --workdir DIR [--config.a.b=值 ...]`。

同一個 workdir 再跑一次即從最新的完整檢查點恢復。所有邏輯在 `speakllm_jax.training.loop`。
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.training.config_io import load_config  # noqa: E402
from speakllm_jax.training.loop import TooManyBadSteps, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phase0", help="階段名稱（phase0…phase3）或設定檔路徑")
    parser.add_argument("--workdir", default="", help="執行資料夾（預設 runs/<階段>）")
    parser.add_argument("--no_progress", action="store_true", help="不顯示進度條")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    workdir = Path(args.workdir or Path("runs") / cfg.phase)
    try:
        result = train(cfg, workdir, progress=not args.no_progress)
    except TooManyBadSteps as err:
        print(f"錯誤：{err}", file=sys.stderr)
        return 3
    losses = result.losses
    if losses:
        print(
            f"完成：第 {result.final_step} 步，損失 {losses[0]:.4f} → {losses[-1]:.4f}；"
            f"輸出在 {workdir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
