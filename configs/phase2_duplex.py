"""第 2 階段：全雙工。在第 1 階段之上加入輪替頭與重疊感知損失，資料為帶重疊標註的雙聲道對話。"""

from __future__ import annotations

import ml_collections

from configs.base import parse_arg
from configs.phase1_sft import get_config as phase1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`：`preset=tiny|full`（或只寫預設名稱），見 `configs.base.parse_arg`。"""
    preset = parse_arg(arg, preset="tiny").preset
    c = phase1(preset)
    c.phase = "phase2_duplex"
    c.data.duplex_sets = "dialogue,instructions"
    c.data.max_frames = 736
    c.train.batch_size = 2
    return c
