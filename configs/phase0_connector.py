"""第 0 階段：只訓練連接器（Whisper 與 Qwen 凍結），以中／英／語碼轉換 ASR 資料對齊兩者。"""

from __future__ import annotations

import ml_collections

from configs.base import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`：`preset=tiny|full`（或只寫預設名稱），見 `configs.base.parse_arg`。"""
    preset = parse_arg(arg, preset="tiny").preset
    c = base_config(preset)
    c.phase = "phase0_connector"
    c.task = "asr_connector"
    c.trainable = ("connector/.*",)
    return c
