"""種子文件的 configs/data/tts_zh 名稱：與 tts.py 相同。"""

from __future__ import annotations

import ml_collections

from configs.data import tts


def get_config() -> ml_collections.ConfigDict:
    c = tts.get_config()
    c.name = "tts_zh"
    return c
