"""評估入口：`python launch/evaluate.py --workdir RUN [--step N]`，報表寫到 `RUN/eval/step_N/`。"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.training.config_io import require_run_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workdir", required=True, help="訓練執行資料夾（含 config.json 與 checkpoints/）"
    )
    p.add_argument("--step", type=int, default=None, help="評估哪一步（預設最新）")
    p.add_argument("--max_utts", type=int, default=32)
    p.add_argument("--max_dialogues", type=int, default=4)
    a = p.parse_args(argv)
    workdir = require_run_dir(a.workdir, a.step)

    from speakllm_jax.eval.evaluate import evaluate_run

    report = evaluate_run(workdir, a.step, a.max_utts, a.max_dialogues)
    summary = {k: v for k, v in report.items() if k not in ("asr", "duplex")}
    if "asr" in report:
        summary["asr"] = {k: v for k, v in report["asr"].items() if k != "items"}
    if "duplex" in report:
        summary["duplex"] = report["duplex"]["metrics"]
        if "emotion" in report["duplex"]:
            summary["emotion_accuracy"] = report["duplex"]["emotion"]["accuracy"]
    print(json.dumps(summary, ensure_ascii=False, indent=2, default=float))
    out_dir = workdir / "eval" / f"step_{report['step']}"
    written = [("報表", out_dir / "report.json")]
    written += [("圖", plot) for plot in report.get("plots", [])]
    quoted = shlex.quote(str(workdir))
    print_summary(
        f"評估完成：第 {report['step']} 步",
        written,
        [f"python -m export.to_torch --checkpoint {quoted} --out exported/{workdir.name}"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
