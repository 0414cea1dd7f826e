"""第 0 → 1 → 2 → 3 階段鏈：tiny 預設、8 個模擬裝置、示範語料；每階段由上一階段初始化且損失下降。"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from speakllm_jax.training.config_io import load_config
from speakllm_jax.training.loop import train

STEPS = {"phase0": 5, "phase1": 5, "phase2": 4, "phase3": 4}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("demo_phases")
    old = os.environ.get("SPEAKLLM_DEMO_DIR")
    os.environ["SPEAKLLM_DEMO_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SPEAKLLM_DEMO_DIR", None)
    else:
        os.environ["SPEAKLLM_DEMO_DIR"] = old


def test_phase_chain_on_8_devices(demo_dir: Path, tmp_path: Path) -> None:
    assert jax.device_count() == 8
    prev = ""
    for phase, steps in STEPS.items():
        overrides = [
            f"--config.train.steps={steps}",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2",
            "--config.checkpoint.every_steps=1000",
            "--config.logging.tensorboard=false",
            "--config.logging.plot=false",
        ]
        # 每個裝置一筆：批次 4 沿 (data, fsdp) 分成 4 份，tensor 軸再切 2 份。
        overrides.append("--config.train.batch_size=4")
        if phase == "phase0":
            overrides.append("--config.data.bucket_frames=(800,)")
        if prev:
            overrides.append(f"--config.checkpoint.init_from={prev}")
        cfg = load_config(phase, overrides)
        workdir = tmp_path / phase
        result = train(cfg, workdir, progress=False)
        assert result.final_step == steps, phase
        losses = np.asarray(result.losses)
        assert np.all(np.isfinite(losses)), (phase, losses)
        assert losses[-1] < losses[0], (phase, losses)
        prev = str(workdir)
