"""全雙工對話語料：Phase 2（雙聲道對話，含附和與搶話標註）。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "duplex",
        [
            dict(
                name="magicdata_ramc",
                registry="magicdata_ramc",
                adapter="magicdata_ramc",
                root="magicdata_ramc",
            ),
            # 本專案格式的雙聲道對話（例如由 RAMC 依說話人分軌或合成而得）。
            dict(name="dialogues", adapter="dialogue", root="dialogues"),
        ],
    )
