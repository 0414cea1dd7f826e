"""TTS／語音生成語料（對應種子的 tts_zh）：Phase 1 語音頭與 Phase 3 情緒。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "tts",
        [
            dict(
                name="aishell3",
                registry="aishell3",
                adapter="aishell3",
                root="aishell3",
                expected_sr=44100,
            ),
            dict(
                name="emilia",
                registry="emilia",
                adapter="emilia",
                root="emilia",
                languages=["zh", "en"],
            ),
            dict(name="libritts", registry="libritts", adapter="libritts", root="libritts"),
            dict(name="esd", registry="esd", adapter="esd", root="esd"),
        ],
    )
