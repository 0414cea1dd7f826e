"""抽取語音符號（旗標沿用種子文件的 extract_voila_tokens.py）。

python data/extract_speech_tokens.py --tokenizer voila --manifest M.jsonl --output OUT \
    --checkpoint /path/to/Voila-Tokenizer [--batch_size 8] [--device cpu] [--no_progress]
python data/extract_speech_tokens.py --tokenizer cosyvoice2 --manifest M.jsonl --output OUT \
    --checkpoint DIR   # DIR 內有 s3tokenizer 版面的 speech_tokenizer_v2.pt（25 Hz，碼本 6561）

OUT 為資料夾（每句一個 .npy）或單一 .npz；重跑時已完成的語句直接跳過。
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.tokenizers.cosyvoice2 import S3CheckpointError  # noqa: E402
from export.tokenizers.extract import (  # noqa: E402
    SUPPORTED_TOKENIZERS,
    extract_speech_tokens,
    load_speech_tokenizer,
)
from speakllm_jax.cli import (  # noqa: E402
    ArgumentParser,
    UserError,
    empty_manifest,
    print_summary,
    require_dir,
    run_cli,
)
from speakllm_jax.data.chain_cli import add_chain_flags, run_chain_cli  # noqa: E402
from speakllm_jax.data.manifest import require_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokenizer", default="voila", choices=SUPPORTED_TOKENIZERS, help="語音符號抽取器"
    )
    p.add_argument("--manifest", required=True, help="輸入 JSONL 清單")
    p.add_argument("--output", required=True, help="輸出資料夾或 .npz 檔")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="本機模型資料夾（Voila-Tokenizer；cosyvoice2 為含 speech_tokenizer_v2.pt 的資料夾）",
    )
    p.add_argument("--batch_size", type=int, default=8, help="每批語句數")
    p.add_argument("--device", default="cpu", help="PyTorch 裝置：cpu、cuda、cuda:0")
    p.add_argument("--max_seconds", type=float, default=60.0, help="長於此秒數的語句略過")
    p.add_argument(
        "--channel",
        type=int,
        default=None,
        help="只取這個聲道（雙聲道對話的助理聲道為 1）；預設混成單聲道",
    )
    p.add_argument(
        "--no_progress", action="store_true", help="不顯示進度條（預設在終端機上顯示於 stderr）"
    )
    add_chain_flags(p, conversion=False)
    a = p.parse_args(argv)
    require_rows(a.manifest)
    require_dir(a.checkpoint, "--checkpoint", "需要本機的語音符號抽取器資料夾（見 --help）")
    if a.shards:
        # 離線鏈：重取樣後在工作者內抽碼（每個工作者載入一次模型），碼與音訊寫進同一個分片。
        return run_chain_cli(
            a,
            output_dir=a.output,
            vad=False,
            tokenizer=a.tokenizer,
            checkpoint=a.checkpoint,
            device=a.device,
            token_batch_size=a.batch_size,
            tokenizer_loader=f"{load_speech_tokenizer.__module__}:{load_speech_tokenizer.__name__}",
        )
    try:
        report = extract_speech_tokens(
            a.manifest,
            a.output,
            a.checkpoint,
            tokenizer=a.tokenizer,
            batch_size=a.batch_size,
            device=a.device,
            max_seconds=a.max_seconds,
            channel=a.channel,
            progress=False if a.no_progress else None,
        )
    except (NotImplementedError, S3CheckpointError) as e:
        raise UserError(f"--checkpoint {a.checkpoint}：{e}") from e
    print(report.table())
    if not report.encoded and not report.already_done:
        raise empty_manifest(a.manifest, f"沒有任何語句抽出語音碼；略過 {len(report.skips)} 筆")
    print_summary(
        f"完成：新抽 {report.encoded} 句、已完成 {report.already_done} 句",
        [("語音碼", a.output)],
        [
            "python launch/train.py --config phase2 --config.data.train_manifests="
            f"{shlex.quote(a.manifest)} --config.data.codes_dirs={shlex.quote(a.output)}"
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
