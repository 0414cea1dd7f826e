"""以 espeak-ng 建立內建示範語料（AISHELL-1、Common Voice 目錄格式、雙聲道對話、語音指令、VAD 標準答案）。

python data/make_demo_corpus.py [--output_dir demo_corpus] [--seed 0] [--scale 1] [--dialogues N]

`--dialogues N` 另在 `output_dir/duplex_dialogues/` 建立 N 段輪替示範對話（句中停頓、附和、搶話，
zh／en／語碼轉換）並寫出其清單；預設語料不受影響。
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.demo_corpus import DEMO_DIR, make_demo_corpus  # noqa: E402
from speakllm_jax.data.demo_data import turn_dialogue_manifest  # noqa: E402
from speakllm_jax.data.demo_dialogues import SPLITS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=DEMO_DIR, help=f"輸出資料夾（預設 {DEMO_DIR}）")
    p.add_argument("--seed", type=int, default=0, help="句子抽選的種子（同種子產出相同檔案）")
    p.add_argument("--scale", type=int, default=1, help="規模倍數（>= 1）")
    p.add_argument("--dialogues", type=int, default=0, help="另建 N 段輪替示範對話（0：不建）")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    info = make_demo_corpus(a.output_dir, seed=a.seed, scale=a.scale)
    print(json.dumps(info, ensure_ascii=False))
    written = [("資料夾", a.output_dir)]
    if a.dialogues:
        for split in (None, *SPLITS):
            m = turn_dialogue_manifest(a.output_dir, n=a.dialogues, seed=a.seed, split=split)
            written.append(("輪替對話清單", str(m)))
    print_summary(
        f"完成：示範語料（{time.perf_counter() - t0:.1f} 秒）",
        written,
        [
            f"python data/build_manifests.py --config configs/data/demo.py --data_root "
            f"{a.output_dir} --output manifests/demo.jsonl"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
