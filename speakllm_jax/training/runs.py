"""訓練執行資料夾（`config.json` + Orbax 檢查點）→ 設定、任務與已載入參數的模型。

評估（`eval/evaluate.py`）與匯出（`export/to_torch.py`）共用，兩者都不必互相依賴。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from speakllm_jax.training.checkpointing import Checkpointer, overlay_params
from speakllm_jax.training.tasks import get_task


def load_run(workdir: str | Path, step: int | None = None) -> tuple[Any, Any, Any, int]:
    """由執行資料夾重建 (設定, 任務, 模型, 步數)。"""
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{workdir} 不是訓練執行資料夾：缺少 config.json")
    cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    task = get_task(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints 中沒有完整的檢查點")
    source = ckpt.restore_params(step)
    ckpt.close()
    # 先建抽象模型（不初始化）；檢查點涵蓋所有變數時直接由它組出模型，省下逐一初始化的時間。
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(int(cfg.seed))))
    graphdef, state = nnx.split(abstract)
    new, copied, bad = overlay_params(nnx.as_pure(state), source)
    if bad:
        raise ValueError(f"檢查點與模型形狀不符：{bad[:5]}")
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(new)):
        model = task.build_model(nnx.Rngs(int(cfg.seed)))
        new, _, _ = overlay_params(nnx.as_pure(nnx.state(model)), source)
        nnx.update(model, new)
    else:
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, new))
    return cfg, task, model, int(step)
