"""重取樣並以 VAD 在靜音處切分清單中的音訊（旗標沿用種子文件）。

python data/resample_split.py --manifest IN.jsonl --output_dir resampled --target_sr 16000 --vad True
輸出：D/manifest.jsonl（含 source_id、source_start、source_end）、D/audio/、D/manifest.skipped.jsonl。
雙聲道對話不切分，只重取樣並保留兩個聲道。
加 `--shards N`（可配 `--runner local --num_workers 2`、`--conversion t2s`）時改跑離線鏈，
另寫 ArrayRecord 分片與 D/index.json（見 docs/data_processing.md）。
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.audio.constants import SAMPLE_RATE  # noqa: E402
from speakllm_jax.audio.vad import VadConfig, resample_split  # noqa: E402
from speakllm_jax.cli import ArgumentParser, empty_manifest, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.chain_cli import add_chain_flags, run_chain_cli  # noqa: E402
from speakllm_jax.data.demo_data import duplex_paths  # noqa: E402
from speakllm_jax.data.manifest import require_rows  # noqa: E402


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"需為 True/False，收到 {s!r}")


def tokenizer_hint() -> str:
    """下一步指令的 `--checkpoint`：主任務建好的示範 Voila-Tokenizer，沒有時為說明文字。"""
    demo = duplex_paths()["tokenizer"]
    if demo.is_dir():
        return f"{shlex.quote(str(demo))}  # 示範用隨機模型；真實資料改用 Voila-Tokenizer 資料夾"
    return "<Voila-Tokenizer 資料夾>"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="輸入清單 JSONL")
    p.add_argument("--output_dir", required=True, help="輸出資料夾")
    p.add_argument("--target_sr", type=int, default=SAMPLE_RATE, help="目標取樣率")
    p.add_argument("--vad", type=_bool, default=True, help="是否以 VAD 去靜音並切分（True/False）")
    p.add_argument("--max_seconds", type=float, default=30.0, help="單一片段的最長秒數")
    p.add_argument("--aggressiveness", type=int, default=2, help="webrtcvad 積極度 0–3")
    p.add_argument("--hangover_ms", type=int, default=300, help="短於此長度的靜音不切斷")
    p.add_argument("--output_manifest", help="輸出清單路徑（預設 OUTPUT_DIR/manifest.jsonl）")
    add_chain_flags(p)
    a = p.parse_args(argv)
    require_rows(a.manifest)
    if a.shards:
        return run_chain_cli(a, conversion=a.conversion)
    cfg = VadConfig(aggressiveness=a.aggressiveness, hangover_ms=a.hangover_ms)
    summary = resample_split(
        a.manifest,
        a.output_dir,
        target_sr=a.target_sr,
        vad=a.vad,
        max_seconds=a.max_seconds,
        cfg=cfg,
        output_manifest=a.output_manifest,
    )
    print(json.dumps(summary, ensure_ascii=False))
    out = Path(a.output_manifest or Path(a.output_dir) / "manifest.jsonl")
    if not summary["output_rows"]:
        raise empty_manifest(
            out, f"輸入 {a.manifest} 的每一列都被略過，原因見 {summary['skipped_file']}"
        )
    codes = Path(a.output_dir) / "codes"
    print_summary(
        f"完成：寫出 {summary['output_rows']} 列",
        [
            ("清單", out),
            ("音訊", Path(a.output_dir) / "audio"),
            ("略過紀錄", summary["skipped_file"]),
        ],
        [
            f"python data/extract_speech_tokens.py --tokenizer voila --manifest "
            f"{shlex.quote(str(out))} --output {shlex.quote(str(codes))} --checkpoint "
            + tokenizer_hint()
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
