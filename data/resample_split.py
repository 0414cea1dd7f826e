"""重取樣並以 VAD 在靜音處切分清單中的音訊（旗標沿用種子文件）。

python data/resample_split.py --manifest IN.jsonl --output_dir resampled --target_sr 16000 --vad True
輸出：D/manifest.jsonl（含 source_id、source_start、source_end）、D/audio/、D/manifest.skipped.jsonl。
雙聲道對話不切分，只重取樣並保留兩個聲道。
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.audio.vad import VadConfig, resample_split  # noqa: E402


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"需為 True/False，收到 {s!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="輸入清單 JSONL")
    p.add_argument("--output_dir", required=True, help="輸出資料夾")
    p.add_argument("--target_sr", type=int, default=16000, help="目標取樣率")
    p.add_argument("--vad", type=_bool, default=True, help="是否以 VAD 去靜音並切分（True/False）")
    p.add_argument("--max_seconds", type=float, default=30.0, help="單一片段的最長秒數")
    p.add_argument("--aggressiveness", type=int, default=2, help="webrtcvad 積極度 0–3")
    p.add_argument("--hangover_ms", type=int, default=300, help="短於此長度的靜音不切斷")
    p.add_argument("--output_manifest", help="輸出清單路徑（預設 OUTPUT_DIR/manifest.jsonl）")
    a = p.parse_args(argv)
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
    return 0 if summary["output_rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
