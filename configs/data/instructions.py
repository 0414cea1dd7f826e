"""語音指令 SFT 語料（對應種子的 mixed_cs／instruction）：Phase 1。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "instructions",
        [
            dict(
                name="voiceassistant_400k",
                registry="voiceassistant_400k",
                adapter="instructions",
                root="voiceassistant_400k",
            ),
            dict(
                name="instructs2s_200k",
                registry="instructs2s_200k",
                adapter="instructions",
                root="instructs2s_200k",
            ),
            dict(
                name="covost2",
                registry="covost2",
                adapter="commonvoice",
                root="covost2",
                locale="zh-CN",
            ),
        ],
    )
