"""示範語料（AISHELL-1 版面的 espeak-ng 合成語音）的 tfds 建構器，輸出 ArrayRecord。

    tfds build speakllm_jax/data/tfds_builders/speakllm_demo --file_format=array_record \\
        [--manual_dir DEMO_CORPUS] [--data_dir DIR]

沒有 `--manual_dir` 時在資料目錄旁離線生成示範語料（需要 espeak-ng）。處理走離線鏈
（t2s 正規化、重取樣 + VAD 切分），每筆範例的 `record` 與 `shards.encode_record` 相同。
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds


class Builder(tfds.core.GeneratorBasedBuilder):
    """speakllm_demo：示範語料的 train／dev／test。"""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "離線鏈輸出（16 kHz PCM16、聲調、清單欄位）。"}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "row": tfds.features.Text(),
                    "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/espeak-ng/espeak-ng",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        from speakllm_jax.data.adapters import build_single
        from speakllm_jax.data.demo_corpus import ensure_demo_corpus
        from speakllm_jax.data.offline_chain import ChainConfig, run_chain

        manual = getattr(dl_manager, "_manual_dir", None)
        root = Path(manual) if manual and Path(manual).is_dir() else None
        if root is None:
            root = ensure_demo_corpus(Path(self.data_dir).parents[1] / "speakllm_demo_corpus")
        work = Path(tempfile.mkdtemp(prefix="speakllm_demo_"))
        build_single("aishell1", Path(root) / "aishell", work / "raw.jsonl", corpus="aishell1")
        run_chain(work / "raw.jsonl", work / "shards", 2, ChainConfig(), runner="inline")
        return {s: self._generate_examples(work / "shards", s) for s in ("train", "dev", "test")}

    def _generate_examples(self, shards: Path, split: str):
        from speakllm_jax.data.shards import ShardReader, shard_rows

        reader = ShardReader(shards)
        for r in shard_rows(shards):
            if r.get("split") != split:
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
