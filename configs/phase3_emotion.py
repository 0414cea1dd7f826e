"""第 3 階段：情緒。在第 2 階段之上以情緒／風格標籤條件化語音輸出，並在使用者串流上加情緒頭。"""

from __future__ import annotations

import ml_collections

from configs.phase2_duplex import get_config as phase2
from speakllm_jax.labels import NUM_EMOTIONS


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = phase2(preset)
    c.phase = "phase3_emotion"
    c.model.num_emotions = NUM_EMOTIONS  # 情緒頭輸出 labels.EMOTIONS 的各類
    c.research.emotion_condition = True
    c.trainable = tuple(c.trainable) + ("emotion_head/.*",)
    return c
