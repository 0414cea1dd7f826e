"""tfds 示範建構器：離線寫出 ArrayRecord，`tfds:` 來源讀回的紀錄與清單列可用，並能訓練幾步。"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="需要 espeak-ng")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from speakllm_jax.data.tfds_builders.speakllm_demo.speakllm_demo_dataset_builder import (
        Builder,
    )

    d = tmp_path_factory.mktemp("tfds")
    b = Builder(data_dir=str(d), file_format="array_record")
    b.download_and_prepare()
    return d, b


def test_demo_builder_writes_array_record_splits(built):
    from speakllm_jax.data.pipeline import source_rows
    from speakllm_jax.data.shards import reader_for

    d, b = built
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    assert set(splits) == {"train", "dev", "test"} and all(n > 0 for n in splits.values())
    assert sorted(p.name for p in (d / "speakllm_demo" / "1.0.0").glob("*.array_record-*"))
    rows = source_rows(f"tfds:speakllm_demo@{d}")
    assert len(rows) == splits["train"] and {r["split"] for r in rows} == {"train"}
    rec = reader_for(rows[0]["_shards"])[rows[0]["shard_record"]]
    assert rec["row"]["id"] == rows[0]["id"] and rec["sample_rate"] == 16000
    assert rec["wave"].shape[0] == rec["num_samples"] > 0
    dev = source_rows(f"tfds:speakllm_demo/dev@{d}")
    assert len(dev) == splits["dev"]


@pytest.mark.slow
def test_train_a_few_steps_from_tfds(built, tmp_path):
    d, _ = built
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        "--config",
        "phase0",
        "--workdir",
        str(tmp_path / "run"),
        "--config.train.steps=2",
        f"--config.data.source=tfds:speakllm_demo@{d}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "第 2 步" in r.stdout
