"""訓練任務：介面與共用部分在 `base`，第 0 階段在 `asr`，第 1–3 階段在 `duplex`；`get_task` 依名稱建立。"""

from __future__ import annotations

from typing import Any

from speakllm_jax.training.tasks.asr import AsrConnectorTask, subset_manifest
from speakllm_jax.training.tasks.base import TASKS, Task
from speakllm_jax.training.tasks.duplex import DuplexTask


def get_task(config: Any) -> Task:
    """依 `config.task` 建立任務；名稱不明時列出可用任務。"""
    if config.task not in TASKS:
        raise KeyError(f"未知的任務 {config.task!r}；可用：{sorted(TASKS)}")
    return TASKS[config.task](config)


__all__ = ["AsrConnectorTask", "DuplexTask", "Task", "get_task", "subset_manifest"]
