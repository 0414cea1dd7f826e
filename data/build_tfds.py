"""建好一個 tfds 建構器（ArrayRecord），不需要 TensorFlow。

python data/build_tfds.py speakllm_demo --data_dir ~/tensorflow_datasets [--manual_dir DIR]
在主環境直接呼叫建構器的 `download_and_prepare`，範例與
`tfds build speakllm_jax/data/tfds_builders/NAME --file_format array_record` 相同；`tfds` 指令本身
需要 TensorFlow 與 Apache Beam，裝在另一個環境（launch/setup_tfds.sh）。
之後訓練：python launch/train.py --config phase0 --config.data.source=tfds:NAME@DATA_DIR
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cli import ArgumentParser, UserValueError, run_cli  # noqa: E402

BUILDERS = (
    "speakllm_demo",
    "speakllm_aishell1",
    "speakllm_commonvoice_zh",
    "speakllm_commonvoice_en",
    "speakllm_dialogue",
)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"建構器名稱：{BUILDERS}")
    p.add_argument("--data_dir", default="~/tensorflow_datasets", help="tfds 資料目錄")
    p.add_argument("--manual_dir", help="已下載（或已生成）的語料資料夾")
    a = p.parse_args(argv)
    if a.name not in BUILDERS:
        raise UserValueError(f"未知的建構器 {a.name!r}；可用：{BUILDERS}")
    import tensorflow_datasets as tfds

    mod = importlib.import_module(
        f"speakllm_jax.data.tfds_builders.{a.name}.{a.name}_dataset_builder"
    )
    data_dir = str(Path(a.data_dir).expanduser())
    builder = mod.Builder(data_dir=data_dir, file_format="array_record")
    cfg = tfds.download.DownloadConfig(manual_dir=a.manual_dir) if a.manual_dir else None
    builder.download_and_prepare(download_config=cfg)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"完成：{a.name} {splits} → {builder.data_dir}")
    print(
        "訓練：python launch/train.py --config phase0 "
        f"--config.data.source=tfds:{a.name}@{data_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
