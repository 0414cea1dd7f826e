"""tfds 示範建構器：離線寫出 ArrayRecord，`tfds:` 來源讀回的紀錄與清單列可用，並能訓練幾步；
真正的 `tfds build` 指令（.venv-tfds）在沒有網路時建出同樣的範例。"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="需要 espeak-ng")
REPO = Path(__file__).resolve().parents[1]
# launch/setup_tfds.sh 建的 `tfds` 指令環境（主環境不裝 TensorFlow／Beam）。
TFDS_VENV = Path(os.environ.get("TFDS_VENV", REPO / ".venv-tfds"))


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


def offline_prefix() -> list[str]:
    """沒有網路介面的命名空間（`unshare -rn`）；系統不允許時回傳空串列。"""
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["unshare", "-rn"] if ok.returncode == 0 else []


@pytest.mark.slow
@pytest.mark.skipif(
    not (TFDS_VENV / "bin/tfds").is_file(), reason="需要 tfds 指令環境（bash launch/setup_tfds.sh）"
)
def test_tfds_cli_build_offline_matches_builder(built, tmp_path):
    from speakllm_jax.data.pipeline import source_rows
    from speakllm_jax.data.shards import reader_for

    d, b = built
    data = tmp_path / "cli"
    prefix = offline_prefix()
    cmd = [
        *prefix,
        str(TFDS_VENV / "bin/tfds"),
        "build",
        "speakllm_jax/data/tfds_builders/speakllm_demo",
        "--data_dir",
        str(data),
        "--manual_dir",
        str(d / "speakllm_demo_corpus/aishell"),
        "--file_format",
        "array_record",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, (prefix, r.stderr[-3000:])
    for split, info in b.info.splits.items():
        ours = source_rows(f"tfds:speakllm_demo/{split}@{d}")
        cli = source_rows(f"tfds:speakllm_demo/{split}@{data}")
        assert len(cli) == info.num_examples > 0
        assert [r["id"] for r in cli] == [r["id"] for r in ours], split
        a, c = reader_for(ours[0]["_shards"]), reader_for(cli[0]["_shards"])
        for x, y in zip(ours, cli, strict=True):
            # 同一個範例（tf.train.Example 的 map 欄位序列化順序可能不同，所以比解析後的內容）
            assert a.example(x["shard_record"]) == c.example(y["shard_record"])
    # 有 TensorFlow 的環境讀 tfds: 來源也不匯入它（只有 tfds 指令匯入）
    code = (
        "import sys\n"
        "from speakllm_jax.data.pipeline import source_rows\n"
        f"rows = source_rows('tfds:speakllm_demo@{data}')\n"
        "print(len(rows), 'tensorflow' in sys.modules, 'apache_beam' in sys.modules)\n"
    )
    out = subprocess.run(
        [str(TFDS_VENV / "bin/python"), "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=True,
    )
    assert out.stdout.split()[-3:] == [str(b.info.splits["train"].num_examples), "False", "False"]


CORPUS_BUILDERS = {
    "speakllm_aishell1": "aishell",
    "speakllm_commonvoice_zh": "commonvoice/cv-corpus-0.0-demo",
    "speakllm_commonvoice_en": "commonvoice/cv-corpus-0.0-demo",
    "speakllm_dialogue": "dialogues",
}


def test_corpus_builders_build_from_manual_dir(tmp_path):
    import importlib.util

    from speakllm_jax.data.demo_corpus import ensure_demo_corpus
    from speakllm_jax.data.pipeline import source_rows
    from speakllm_jax.data.shards import reader_for
    from speakllm_jax.text.codeswitch import is_han

    spec = importlib.util.spec_from_file_location("build_tfds", REPO / "data/build_tfds.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    demo = Path(ensure_demo_corpus(tmp_path / "demo"))
    data = tmp_path / "tfds"
    for name, sub in CORPUS_BUILDERS.items():
        assert cli.main([name, "--data_dir", str(data), "--manual_dir", str(demo / sub)]) == 0
        rows = source_rows(f"tfds:{name}@{data}")
        assert rows and all(r["sample_rate"] == 16000 for r in rows), name
        rec = reader_for(rows[0]["_shards"])[rows[0]["shard_record"]]
        assert rec["row"]["id"] == rows[0]["id"]
        if name == "speakllm_dialogue":
            assert rec["channels"] == 2 and rec["row"]["turns"]
        if name == "speakllm_commonvoice_zh":
            # zh-TW 的繁體文字經 t2s 成簡體
            assert any(r["text_raw"] != r["text"] for r in rows)
            assert all(any(is_han(c) for c in r["text"]) for r in rows)
        if name == "speakllm_commonvoice_en":
            assert all(r["language"] == "en" for r in rows)


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
