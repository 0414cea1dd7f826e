"""由資料設定產生清單 JSONL（旗標沿用種子文件），並寫出每筆略過的原因。

python data/build_manifests.py --config configs/data/demo.py --output manifests/demo.jsonl
python data/build_manifests.py --corpus aishell1 --root /data/aishell --output aishell.jsonl
輸出：OUT.jsonl、OUT.skipped.jsonl（每筆略過的鍵、原因、說明）與印出的摘要。
加 `--shards N [--runner local --num_workers 2]` 時接著跑整條離線鏈，分片寫到 OUT 旁的 <名稱>_shards/。
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, empty_manifest, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.adapters import ADAPTERS, build_manifests, build_single  # noqa: E402
from speakllm_jax.data.chain_cli import add_chain_flags, run_chain_cli  # noqa: E402
from speakllm_jax.data.registry import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="資料設定檔（configs/data/*.py；.yaml 名稱會對應到同名 .py）")
    p.add_argument("--output", required=True, help="輸出清單 JSONL")
    p.add_argument("--data_root", help="覆寫設定中的 data_root（語料根目錄）")
    p.add_argument("--only", nargs="*", help="只處理這些語料名稱")
    p.add_argument("--splits", nargs="*", help="只保留這些切分（train dev test …）")
    p.add_argument("--check_audio", choices=("header", "full"), help="覆寫設定的音訊檢查層級")
    p.add_argument("--corpus", help=f"單一語料模式的轉接器名稱：{sorted(ADAPTERS)}")
    p.add_argument("--root", help="單一語料模式的語料資料夾")
    add_chain_flags(p)
    a = p.parse_args(argv)
    if a.config:
        cfg = load_config(a.config).to_dict()
        if a.check_audio:
            cfg["check_audio"] = a.check_audio
        summary = build_manifests(
            cfg, a.output, data_root=a.data_root, only=a.only, splits=a.splits
        )
    elif a.corpus and a.root:
        summary = build_single(a.corpus, a.root, a.output)
    else:
        p.error("需要 --config，或同時給 --corpus 與 --root")
    print(json.dumps(summary, ensure_ascii=False))
    if not summary["rows"]:
        n = summary["skipped"]["total"]
        raise empty_manifest(a.output, f"略過 {n} 筆，原因見 {summary['skipped_file']}")
    out = Path(a.output)
    if a.shards:
        # 整條離線鏈：正規化（預設 t2s）、重取樣 + VAD 切分，寫到 OUT 旁的 <名稱>_shards/。
        a.manifest = str(out)
        conv = a.conversion or "t2s"
        shards_dir = str(out.with_name(out.stem + "_shards"))
        return run_chain_cli(a, output_dir=shards_dir, conversion=None if conv == "none" else conv)
    normed = out.with_name(out.stem + "_norm.jsonl")
    print_summary(
        f"完成：{summary['rows']} 列",
        [("清單", out), ("略過紀錄", summary["skipped_file"])],
        [
            f"python data/normalize_text_zh.py --manifest {shlex.quote(str(out))} "
            f"--output {shlex.quote(str(normed))} --conversion t2s"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
