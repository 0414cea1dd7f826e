"""第 1 階段改用 CosyVoice2 語音頭（`speech_head="cosyvoice2"`）：示範語料的 CosyVoice2 碼
（示範用隨機 S3 tokenizer 抽出）上訓練，損失下降；talker 參數確實被訓練。

約 1 分鐘、幾乎全是編譯，標為 slow（CI 的 slow 集執行）；預設測試裡 CosyVoice2 頭的前向、匯出
與服務仍由 test_talker*、test_export、test_serving_cosyvoice2 檢查。
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from speakllm_jax.config import load_config
from speakllm_jax.training.loop import train
from speakllm_jax.training.runs import load_run


@pytest.mark.slow
def test_phase1_cosyvoice2_trains_and_loss_falls(demo_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "phase1",
        [
            "--config.model.speech_head=cosyvoice2",
            "--config.train.steps=8",
            "--config.mesh.data=1",
            "--config.checkpoint.every_steps=1000",
            "--config.logging.tensorboard=false",
            "--config.logging.plot=false",
        ],
    )
    result = train(cfg, tmp_path, progress=False)
    losses = np.asarray(result.losses)
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    # 用的確實是 CosyVoice2 碼：單碼本、碼在 [0, 6561)。
    codes_dir = demo_dir / "duplex" / "codes_cosyvoice2_dialogue"
    arr = np.load(next(codes_dir.glob("*.npy")))
    assert arr.shape[0] == 1 and arr.min() >= 0 and arr.max() < 6561

    _, task, model, step = load_run(tmp_path)
    assert step == 8
    fresh = task.build_model(nnx.Rngs(int(cfg.seed)))
    trained = jax.tree_util.tree_leaves(nnx.state(model.speech_head, nnx.Param))
    init = jax.tree_util.tree_leaves(nnx.state(fresh.speech_head, nnx.Param))
    assert len(trained) == len(init) > 0
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(trained, init))
    assert moved > 0, "talker 參數沒有被訓練"
