"""下載資料設定中列出的真實語料（先印授權與條款），或註冊本機已有的副本。

python data/download.py --config configs/data/asr_zh.py --dry_run
python data/download.py --config configs/data/asr_zh.py --accept_terms --output_dir data/raw
python data/download.py --config configs/data/asr_zh.py --local aishell1=/mnt/corpora/aishell
離線時在連線檢查（3 秒）立即失敗；改用 --local NAME=DIR 註冊本機副本。
python data/download.py --config configs/data/demo.py     # 示範語料：離線以 espeak-ng 生成
需同意條款的 Hugging Face 語料讀 HF_TOKEN（環境變數或 .env，見 .env.example；從不印出）。
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, print_summary, run_cli  # noqa: E402
from speakllm_jax.data.registry import (  # noqa: E402
    REGISTRY,
    DownloadError,
    download_corpus,
    load_config,
    register_local,
)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="資料設定檔（其 download 欄列出登錄表名稱）")
    p.add_argument("--names", nargs="*", help=f"直接指定語料：{sorted(REGISTRY)}")
    p.add_argument("--output_dir", help="下載目的地（預設為設定的 data_root）")
    p.add_argument(
        "--local",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="註冊本機已有的副本（可重複）；不下載",
    )
    p.add_argument("--dry_run", action="store_true", help="只印授權與計畫，不連網")
    p.add_argument("--accept_terms", action="store_true", help="同意需申請／非商業語料的條款")
    p.add_argument("--connect_timeout", type=float, default=3.0, help="連線檢查逾時秒數")
    a = p.parse_args(argv)
    cfg = load_config(a.config) if a.config else None
    names = list(a.names or (cfg.download if cfg else []))
    out = Path(a.output_dir or (cfg.data_root if cfg else "data/raw"))
    if a.local:
        for item in a.local:
            name, sep, path = item.partition("=")
            if not sep:
                p.error(f"--local 需為 NAME=DIR，收到 {item!r}")
            reg = register_local(name, path, out)
            print(f"已註冊 {name} → {Path(path).resolve()}（{reg}）")
        print_summary("完成：已註冊本機副本", [("登記檔", reg)], [_next_command(a.config, out)])
        return 0
    if not names:
        p.error("沒有要下載的語料：給 --config 或 --names")
    failed = {}
    for name in names:
        try:
            download_corpus(
                name,
                out,
                accept_terms=a.accept_terms,
                dry_run=a.dry_run,
                connect_timeout=a.connect_timeout,
            )
        except DownloadError as e:
            print(f"失敗：{e}", file=sys.stderr)
            failed[name] = str(e)
            if "無法在" in str(e):  # 離線：其餘語料也不可能成功，立即結束
                break
    if failed:
        print(f"{len(failed)} 個語料未完成：{sorted(failed)}", file=sys.stderr)
        return 2
    if not a.dry_run:
        print_summary("完成：語料已下載", [("資料夾", out)], [_next_command(a.config, out)])
    return 0


def _next_command(config: str | None, out: Path) -> str:
    """下一步：由資料設定建立清單。"""
    cfg = config or "configs/data/asr_zh.py"
    return (
        f"python data/build_manifests.py --config {cfg} --data_root {out} "
        f"--output manifests/{Path(cfg).stem}.jsonl"
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
