"""資料 CLI 共用的離線鏈旗標：`--runner`、`--num_workers`、`--shards`（給了 `--shards` 才改跑離線鏈）。"""

from __future__ import annotations

import argparse
import json
from typing import Any

from speakllm_jax.cli import UserValueError, empty_manifest
from speakllm_jax.data.offline_chain import ChainConfig, check_runner, run_chain


def add_chain_flags(p: argparse.ArgumentParser, conversion: bool = True) -> None:
    """加上離線鏈旗標；`conversion=True` 時另加 `--conversion`（預設不正規化文字）。"""
    g = p.add_argument_group("離線鏈（ArrayRecord 分片）")
    g.add_argument("--shards", type=int, default=0, help="分片數；給了才改跑離線鏈並寫出分片")
    g.add_argument(
        "--runner", default="local", help="inline、local（本機 Ray）、auto 或 ray://HOST:PORT"
    )
    g.add_argument("--num_workers", type=int, default=2, help="本機 Ray 的工作者數")
    g.add_argument(
        "--audio_format", default="pcm16", choices=("pcm16", "flac"), help="分片中的音訊格式"
    )
    if conversion:
        g.add_argument("--conversion", help="離線鏈中同時做的 OpenCC 轉換（t2s 等；預設不轉）")


def run_chain_cli(a: argparse.Namespace, output_dir: str | None = None, **overrides: Any) -> int:
    """依 CLI 參數跑離線鏈，印出摘要；全部被略過時以 `錯誤：…` 結束（結束碼 2）。"""
    try:
        check_runner(a.runner)
    except ValueError as e:
        raise UserValueError(str(e)) from e
    if a.shards < 0 or a.num_workers <= 0:
        raise UserValueError(
            f"--shards 與 --num_workers 必須為正，收到 {a.shards}、{a.num_workers}"
        )
    names = {"target_sr", "vad", "max_seconds", "aggressiveness", "hangover_ms", "audio_format"}
    kw = {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}
    kw.update(overrides)
    kw.setdefault("conversion", None)
    out = output_dir or a.output_dir
    summary = run_chain(
        a.manifest, out, a.shards, ChainConfig(**kw), runner=a.runner, num_workers=a.num_workers
    )
    print(json.dumps(summary, ensure_ascii=False))
    if not summary["records"]:
        raise empty_manifest(
            out, f"輸入 {a.manifest} 的每一列都被略過，原因見 {summary['skipped_file']}"
        )
    print(f"訓練：python launch/train.py --config phase0 --config.data.source=shards:{out}")
    return 0
