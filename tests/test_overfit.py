"""過擬合：第 0 階段在 4 句示範語音上訓練（tiny 預設的 Qwen 是隨機的，所以連同 LLM 一起訓練），
損失降到一半以下，且同一批句子的 ASR CER 由未訓練時的值明顯下降。"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flax import nnx

from speakllm_jax.eval.evaluate import evaluate_asr, load_run
from speakllm_jax.training.config_io import load_config
from speakllm_jax.training.loop import train


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("demo_overfit")
    old = os.environ.get("SPEAKLLM_DEMO_DIR")
    os.environ["SPEAKLLM_DEMO_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SPEAKLLM_DEMO_DIR", None)
    else:
        os.environ["SPEAKLLM_DEMO_DIR"] = old


def test_phase0_overfit_loss_halves_and_cer_drops(demo_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "phase0",
        [
            "--config.train.steps=80",
            "--config.data.subset=4",
            "--config.train.batch_size=4",
            "--config.mesh.data=1",
            "--config.data.bucket_frames=(800,)",
            "--config.optim.warmup_steps=5",
            "--config.checkpoint.every_steps=1000",
            "--config.logging.tensorboard=false",
            '--config.trainable=("connector/.*","llm/.*")',
        ],
    )
    result = train(cfg, tmp_path, progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses

    cfg2, task, model, step = load_run(tmp_path)
    assert step == 80
    subset = sorted((demo_dir / "manifests").glob("*.subset4.jsonl"))
    assert len(subset) == 1
    with cfg2.unlocked():
        cfg2.data.eval_manifests = str(subset[0])
    trained = evaluate_asr(cfg2, task, model, max_utts=4)
    untrained = evaluate_asr(cfg2, task, task.build_model(nnx.Rngs(0)), max_utts=4)
    assert trained["utterances"] == untrained["utterances"] == 4
    assert untrained["cer"] >= 0.9
    assert trained["cer"] < 0.6 and trained["cer"] < untrained["cer"] - 0.3
