"""正規化清單中的中文文字（旗標沿用種子文件）。

python data/normalize_text_zh.py --manifest IN.jsonl --output OUT.jsonl --conversion t2s
加 `--shards N [--runner local --num_workers 2]` 時改跑離線鏈（正規化 + 重取樣），OUT 為分片資料夾。
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.audio.constants import SAMPLE_RATE  # noqa: E402
from speakllm_jax.cli import ArgumentParser, empty_manifest, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.chain_cli import add_chain_flags, run_chain_cli  # noqa: E402
from speakllm_jax.data.manifest import require_rows  # noqa: E402
from speakllm_jax.text.manifest_text import normalize_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="輸入 JSONL 清單")
    p.add_argument("--output", required=True, help="輸出 JSONL 清單")
    p.add_argument("--conversion", default="t2s", help="OpenCC 轉換：t2s、tw2s、hk2s、s2t、none")
    p.add_argument("--verbalize_numbers", action="store_true", help="數字改為中文讀法")
    p.add_argument("--strip_punct", action="store_true", help="去除標點")
    add_chain_flags(p, conversion=False)
    a = p.parse_args(argv)
    require_rows(a.manifest)
    if a.shards:
        # 離線鏈：正規化 + 重取樣（不切分），--output 為分片資料夾。
        return run_chain_cli(
            a,
            output_dir=a.output,
            conversion=a.conversion if a.conversion != "none" else None,
            verbalize_numbers=a.verbalize_numbers,
            keep_punct=not a.strip_punct,
            vad=False,
        )
    report = normalize_manifest(
        a.manifest,
        a.output,
        conversion=a.conversion,
        verbalize=a.verbalize_numbers,
        keep_punct=not a.strip_punct,
    )
    print(report.table())
    out = Path(a.output)
    if not report.written:
        raise empty_manifest(out, f"輸入 {a.manifest} 的每一列都被略過：{dict(report.skipped)}")
    resampled = out.parent / "resampled"
    print_summary(
        f"完成：寫出 {report.written} 列",
        [("清單", out)],
        [
            f"python data/resample_split.py --manifest {shlex.quote(str(out))} "
            f"--output_dir {shlex.quote(str(resampled))} --target_sr {SAMPLE_RATE} --vad True"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
