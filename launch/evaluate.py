"""評估入口：`python launch/evaluate.py --workdir RUN [--step N]`，報表寫到 `RUN/eval/step_N/`。

全雙工伺服器評估（Full-Duplex-Bench 式，經 loopback gRPC 伺服器）：
`python launch/evaluate.py --workdir RUN --duplex-server --manifest M.jsonl --policies model,vad
--out DIR [--model_dir EXPORTED] [--voila_dir D | --token2wav_dir D] [--realtime]
[--turn_rule KEY=VALUE ...] [--concurrency N]`；沒給 `--model_dir` 時先把 RUN 匯出到 `DIR/export`。`--turn_rule`
覆寫匯出的輪替決策規則（`TurnRule` 的欄位，不必重新匯出）。報表見 `export/serving/duplex_eval.py`。
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.training.config_io import require_run_dir  # noqa: E402
from speakllm_jax.turn_policy import check_rule_names, parse_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workdir", required=True, help="訓練執行資料夾（含 config.json 與 checkpoints/）"
    )
    p.add_argument("--step", type=int, default=None, help="評估哪一步（預設最新）")
    p.add_argument("--max_utts", type=int, default=32)
    p.add_argument("--max_dialogues", type=int, default=4)
    p.add_argument("--duplex-server", action="store_true", help="經真正的伺服器做輪替評估")
    p.add_argument(
        "--manifest",
        default="",
        help="評估的清單（缺省：執行設定的 data.eval_manifests）；--duplex-server 時必填"
        "（對話的 turns、overlaps、pauses）",
    )
    p.add_argument("--policies", default="model,vad", help="--duplex-server：並列的策略")
    p.add_argument("--out", default="", help="--duplex-server：輸出資料夾")
    p.add_argument("--model_dir", default="", help="--duplex-server：已匯出的模型（不再匯出 RUN）")
    p.add_argument("--voila_dir", default="", help="Voila-Tokenizer（預設：示範解碼器）")
    p.add_argument("--token2wav_dir", default="", help="CosyVoice2 token2wav（預設：示範解碼器）")
    p.add_argument("--realtime", action="store_true", help="依音訊時間串流（預設加速時鐘）")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="--duplex-server：同時串流的會話數（伺服器一批前進；預設逐一）",
    )
    p.add_argument(
        "--turn_rule",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--duplex-server：覆寫匯出的輪替決策規則（TurnRule 的欄位；可重複或以逗號分隔）",
    )
    a = p.parse_args(argv)
    configure_cpu_simulation()
    for m in (x for x in a.manifest.split(",") if x):
        if not Path(m).is_file():
            print(f"錯誤：--manifest {m} 不存在", file=sys.stderr)
            return 2
    if a.duplex_server:
        return _duplex_server(a)
    workdir = require_run_dir(a.workdir, a.step)

    # 延後匯入：先設定 CPU 模擬再載入 JAX
    from speakllm_jax.eval.evaluate import evaluate_run

    report = evaluate_run(workdir, a.step, a.max_utts, a.max_dialogues, a.manifest)
    summary = {k: v for k, v in report.items() if k not in ("asr", "duplex")}
    if "asr" in report:
        summary["asr"] = {k: v for k, v in report["asr"].items() if k != "items"}
    if "duplex" in report:
        summary["duplex"] = report["duplex"]["metrics"]
        tones = report["duplex"].get("tone_head_accuracy") or {}
        summary["tone_head_accuracy"] = tones.get("accuracy")
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


def _duplex_server(a: argparse.Namespace) -> int:
    # 延後匯入：只有 --duplex-server 需要 torch 與 gRPC 伺服器
    from export.serving.duplex_eval import (
        demo_decoder_dir,
        dialogue_rows,
        evaluate_duplex_server,
        exported_rule,
        parse_policies,
    )

    try:
        policies = parse_policies(a.policies)
    except ValueError as e:
        print(f"錯誤：{e}", file=sys.stderr)
        return 2
    try:
        rule_over = parse_overrides(a.turn_rule)
        check_rule_names(rule_over)  # 匯出之前先擋下打錯的欄位；值在匯出後與匯出的規則合併檢查
    except ValueError as e:
        print(f"錯誤：{e}", file=sys.stderr)
        return 2
    for flag, value in (("--manifest", a.manifest), ("--out", a.out)):
        if not value:
            print(f"錯誤：--duplex-server 需要 {flag}", file=sys.stderr)
            return 2
    try:
        dialogue_rows(a.manifest, max_dialogues=1)  # 匯出與載入模型之前先確認清單裡有對話列
    except ValueError as e:
        print(f"錯誤：{e}", file=sys.stderr)
        return 2
    if a.model_dir and not (Path(a.model_dir) / "heads_config.json").is_file():
        print(
            f"錯誤：--model_dir {a.model_dir} 沒有 heads_config.json（不是匯出的模型資料夾）",
            file=sys.stderr,
        )
        return 2
    model_dir = a.model_dir
    if not model_dir:
        # 延後匯入：只有沒給 --model_dir 時才匯出（torch）
        from export.to_torch import export_run

        model_dir = str(Path(a.out) / "export")
        export_run(a.workdir, model_dir, a.step, parity_seed=None)
    decoders = {"voila_dir": a.voila_dir, "token2wav_dir": a.token2wav_dir}
    if not (a.voila_dir or a.token2wav_dir):
        decoders.update(demo_decoder_dir(model_dir, a.out))
    overrides = {"turn_rule": ",".join(f"{k}={v}" for k, v in rule_over.items())}
    try:
        rule = exported_rule(model_dir, overrides["turn_rule"])
    except ValueError as e:
        print(f"錯誤：--turn_rule：{e}", file=sys.stderr)
        return 2
    print(f"輪替決策規則（policy=model）：{rule.to_dict()}")
    try:
        report = evaluate_duplex_server(
            model_dir,
            a.manifest,
            a.out,
            policies,
            realtime=a.realtime,
            overrides=overrides,
            concurrency=a.concurrency,
            **decoders,
        )
    except ValueError as e:  # 清單沒有對話列、對話太長等使用者輸入問題
        print(f"錯誤：{e}", file=sys.stderr)
        return 2
    print((Path(a.out) / "turn_taking.md").read_text("utf-8"))
    print(f"{report['n_dialogues']} 段對話；報表：{Path(a.out) / 'turn_taking.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
