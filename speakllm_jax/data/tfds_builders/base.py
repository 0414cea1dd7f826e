"""tfds 建構器的共同基底：轉接器讀語料 → 離線鏈（inline）→ 每筆一個 tfds 範例（ArrayRecord）。

子類別設定 `ADAPTER`（`adapters.py` 的名稱）、`LOCATIONS`（語料根目錄下要讀的子資料夾與轉接器選項）
與 `CORPUS`；語料根目錄由 `--manual_dir` 給（`data/build_tfds.py NAME --manual_dir DIR`，
或 `tfds build … --manual_dir DIR`）。
`DEMO_SUBDIR` 不為 None 的建構器在沒給 `--manual_dir` 時離線生成示範語料並讀其中的子資料夾。
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from speakllm_jax.audio.io import SkipCounter
from speakllm_jax.cli import UserFileError
from speakllm_jax.data.adapters import run_adapter
from speakllm_jax.data.demo_corpus import ensure_demo_corpus
from speakllm_jax.data.manifest import validate_row, write_manifest
from speakllm_jax.data.offline_chain import ChainConfig, run_chain
from speakllm_jax.data.shards import ShardReader, shard_rows

FEATURES = {
    "id": tfds.features.Text(),
    "row": tfds.features.Text(),
    "record": tfds.features.Tensor(shape=(), dtype=np.object_),
}


class ChainBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """以離線鏈處理一個語料的 tfds 建構器（見模組說明）。"""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "離線鏈輸出（16 kHz PCM16、聲調、清單欄位）。"}
    ADAPTER = ""
    CORPUS = ""
    # [(子資料夾, 轉接器選項)]；子資料夾不存在的項目略過（例如只下載了一種語言）。
    LOCATIONS: tuple[tuple[str, dict[str, Any]], ...] = ((".", {}),)
    DEMO_SUBDIR: str | None = None
    NUM_SHARDS = 2
    CHAIN: dict[str, Any] = {}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "以 --manual_dir 指向已下載的語料根目錄（見 docs/datasets.md）。"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(dict(FEATURES)), supervised_keys=None
        )

    def _corpus_root(self, dl_manager: Any) -> Path:
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual and Path(manual).is_dir():
            return Path(manual)
        if self.DEMO_SUBDIR is None:
            raise UserFileError(
                f"{self.name}：需要 --manual_dir（{self.MANUAL_DOWNLOAD_INSTRUCTIONS}）"
            )
        demo = ensure_demo_corpus(Path(self.data_dir).parents[1] / "speakllm_demo_corpus")
        return Path(demo) / self.DEMO_SUBDIR

    def _split_generators(self, dl_manager: Any) -> dict:
        root = self._corpus_root(dl_manager)
        skips = SkipCounter()
        rows = []
        for sub, options in self.LOCATIONS:
            if not (root / sub).is_dir():
                continue
            opts = dict(options)
            opts.setdefault("corpus", self.CORPUS or self.name)
            for r in run_adapter(self.ADAPTER, root / sub, skips, **opts):
                if not validate_row(r):
                    rows.append(r)
        if not rows:
            raise UserFileError(f"{root}：{self.ADAPTER} 轉接器沒有讀到任何列（{skips.report()}）")
        work = Path(tempfile.mkdtemp(prefix=f"{self.name}_"))
        write_manifest(work / "raw.jsonl", rows)
        cfg = ChainConfig(**self.CHAIN)
        run_chain(work / "raw.jsonl", work / "shards", self.NUM_SHARDS, cfg, runner="inline")
        splits = sorted({str(r.get("split") or "train") for r in shard_rows(work / "shards")})
        return {s: self._generate_examples(work / "shards", s) for s in splits}

    def _generate_examples(self, shards: Path, split: str):
        reader = ShardReader(shards)
        for r in shard_rows(shards):
            if str(r.get("split") or "train") != split:
                continue
            row = {k: v for k, v in r.items() if not k.startswith("_") and k != "shard_record"}
            yield (
                r["id"],
                {
                    "id": r["id"],
                    "row": json.dumps(row, ensure_ascii=False, sort_keys=True),
                    "record": reader.raw(r["shard_record"]),
                },
            )
