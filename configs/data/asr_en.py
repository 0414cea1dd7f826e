"""英文 ASR 語料。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "asr_en",
        [
            dict(
                name="librispeech",
                registry="librispeech",
                adapter="librispeech",
                root="librispeech",
            ),
            dict(
                name="commonvoice_en",
                registry="commonvoice_en",
                adapter="commonvoice",
                root="commonvoice_en",
                locale="en",
            ),
        ],
    )
