"""資料設定共用的建構函式。"""

from __future__ import annotations

import ml_collections


def data_config(
    name: str, corpora: list[dict], data_root: str = "data/raw", check_audio: str = "header"
) -> ml_collections.ConfigDict:
    """組出資料設定。

    corpora 每項：name（清單中的語料名）、adapter（轉接器）、root（相對於 data_root）、
    registry（登錄表名稱，供下載與 --local 本機副本對應），其餘欄位原樣傳給轉接器。
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.data_root = data_root
    # "header"：只讀標頭；"full"：另讀整段音訊檢查削波與靜音（慢，真實語料預設不開）。
    c.check_audio = check_audio
    c.check_options = ml_collections.ConfigDict(dict(max_clip_fraction=0.001, silence_rms=1e-4))
    c.relative_paths = False
    c.download = sorted({x["registry"] for x in corpora if x.get("registry")})
    c.corpora = corpora
    return c
