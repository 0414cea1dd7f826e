"""以 espeak-ng 建立內建示範語料（AISHELL-1、Common Voice 目錄格式、雙聲道對話、語音指令、VAD 標準答案）。

python data/make_demo_corpus.py --output_dir data/demo [--seed 0] [--scale 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.demo_corpus import make_demo_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="輸出資料夾")
    p.add_argument("--seed", type=int, default=0, help="句子抽選的種子（同種子產出相同檔案）")
    p.add_argument("--scale", type=int, default=1, help="規模倍數（>= 1）")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    info = make_demo_corpus(a.output_dir, seed=a.seed, scale=a.scale)
    print(json.dumps(info, ensure_ascii=False))
    print_summary(
        f"完成：示範語料（{time.perf_counter() - t0:.1f} 秒）",
        [("資料夾", a.output_dir)],
        [
            f"python data/build_manifests.py --config configs/data/demo.py --data_root "
            f"{a.output_dir} --output manifests/demo.jsonl"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
