"""tfds 建構器（`tfds build speakllm_jax/data/tfds_builders/<名稱>`）與讀它們輸出的分片。

建構器以離線鏈處理語料，每筆 tfds 範例帶 `id`、`row`（清單欄位 JSON）與 `record`
（與 `shards.encode_record` 相同的紀錄位元組），檔案格式為 ArrayRecord。輸入管線以
`tfds:NAME[/SPLIT][@DATA_DIR]` 讀取：逐筆解析 tfds 的 `tf.train.Example`（tfds 內附的 proto，
不需要 TensorFlow），取出紀錄，其餘與 `shards:DIR` 相同。
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from speakllm_jax.cli import UserFileError
from speakllm_jax.data.shards import TfdsReader


def parse_spec(spec: str, split: str = "train") -> tuple[str, str, Path]:
    """`NAME[/SPLIT][@DATA_DIR]` → (名稱, 切分, 資料目錄)；資料目錄預設 `TFDS_DATA_DIR` 或
    `~/tensorflow_datasets`。"""
    spec, _, data_dir = spec.partition("@")
    name, _, given = spec.partition("/")
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return name, given or split, Path(root).expanduser()


def split_files(name: str, split: str, data_dir: Path) -> list[str]:
    """資料集最新版本中某切分的 ArrayRecord 檔；找不到時以 `UserFileError` 指出。"""
    base = data_dir / name
    versions = sorted(
        (p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()),
    )
    if not versions:
        raise UserFileError(f"{base}：沒有建好的 tfds 資料集（先執行 tfds build）")
    files = sorted(str(p) for p in versions[-1].glob(f"{name}-{split}.array_record-*"))
    if not files:
        raise UserFileError(f"{versions[-1]}：沒有切分 {split!r} 的 ArrayRecord 檔")
    return files


def tfds_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """tfds 資料集一個切分的清單列（每列帶 `_shards` 讀取鍵與 `shard_record`）。"""
    name, split, data_dir = parse_spec(spec, split)
    files = split_files(name, split, data_dir)
    reader = TfdsReader(files)
    key = "tfds-files:" + json.dumps(files)
    rows = []
    for i in range(len(reader)):
        f = reader.example(i).features.feature
        row = json.loads(f["row"].bytes_list.value[0].decode("utf-8"))
        row.update(_shards=key, shard_record=i, _manifest_dir=str(Path(files[0]).parent))
        rows.append(row)
    return rows
