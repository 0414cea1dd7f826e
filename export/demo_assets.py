"""示範用的隨機初始化小模型（以 JAX 建立、匯出成 PyTorch 資料夾）與語音解碼器。

`python -m export.serving.server --demo-assets DIR` 與測試、基準用它；放在 `export/`（入口層）而不是
服務端，因為它需要訓練任務（JAX），服務端本身不匯入 JAX。
"""

from __future__ import annotations

import json
from pathlib import Path

from export.cosyvoice2.token2wav import TOKEN2WAV_CONFIG, save_random_token2wav
from export.tokenizers.voila import make_demo_voila_tokenizer
from speakllm_jax.config import load_config


def build_demo_assets(
    out_dir: str | Path, phase: str = "phase2", seed: int = 0, speech_head: str = "voila"
) -> tuple[Path, Path]:
    """建立示範用的隨機初始化小模型（匯出成 PyTorch 資料夾）與語音解碼器；已存在就沿用。

    `speech_head="voila"` 回傳（模型資料夾, Voila-Tokenizer 資料夾）；`"cosyvoice2"` 回傳
    （模型資料夾, 隨機 tiny token2wav 資料夾，`save_random_token2wav`）。需要 JAX 與示範語料
    （必要時以 espeak-ng 生成）。
    """
    if speech_head not in ("voila", "cosyvoice2"):
        raise ValueError(f"speech_head={speech_head!r}；示範資產只支援 voila、cosyvoice2")
    out = Path(out_dir)
    model_dir = out / "model"
    if not (model_dir / "heads_config.json").exists():
        # 延後匯入：伺服器匯入本模組，只在建示範模型時才載入 JAX 與訓練任務
        from flax import nnx

        from export.to_torch import export_model
        from speakllm_jax.training.tasks import get_task

        overrides = [] if speech_head == "voila" else [f"--config.model.speech_head={speech_head}"]
        task = get_task(load_config(phase, overrides))
        model = task.build_model(nnx.Rngs(seed))
        pad_id = int(getattr(task, "pad_id", task.tokenizer.eos_id))
        tmp = out / "model.tmp"
        export_model(model, tmp, task.tokenizer, pad_id=pad_id, parity_seed=None)
        tmp.replace(model_dir)
    head = json.loads((model_dir / "heads_config.json").read_text(encoding="utf-8"))["speech_head"]
    if head != speech_head:
        raise ValueError(f"{model_dir} 已存在但 speech_head={head!r}，要求的是 {speech_head!r}")
    if speech_head == "cosyvoice2":
        t2w_dir = out / "token2wav"
        if not (t2w_dir / TOKEN2WAV_CONFIG).exists():
            save_random_token2wav(t2w_dir, seed=seed)
        return model_dir, t2w_dir
    voila_dir = out / "voila"
    make_demo_voila_tokenizer(voila_dir, seed=seed)
    return model_dir, voila_dir
