"""種子文件的 configs/data/mixed_cs：中英語碼轉換 ASR 加語音指令語料。"""

from __future__ import annotations

import ml_collections

from configs.data import instructions
from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    corpora = [dict(name="talcs", registry="talcs", adapter="kaldi", root="talcs")]
    corpora += [dict(x) for x in instructions.get_config().corpora]
    return data_config("mixed_cs", corpora)
