"""第 3 階段：情緒。在第 2 階段之上以情緒／風格標籤條件化語音輸出，並在使用者串流上加情緒頭。"""

from __future__ import annotations

import ml_collections

from configs.base import parse_arg
from configs.phase2_duplex import get_config as phase2
from speakllm_jax.labels import NUM_EMOTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`：`preset=tiny|full`（或只寫預設名稱），見 `configs.base.parse_arg`。"""
    preset = parse_arg(arg, preset="tiny").preset
    c = phase2(preset)
    c.phase = "phase3_emotion"
    c.model.num_emotions = NUM_EMOTIONS  # 情緒頭輸出 labels.EMOTIONS 的各類
    c.research.emotion_condition = True
    c.trainable = tuple(c.trainable) + ("emotion_head/.*",)
    return c
