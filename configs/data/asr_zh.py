"""中文（含語碼轉換）ASR 語料：Phase 0 連接器訓練。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "asr_zh",
        [
            dict(
                name="aishell1",
                registry="aishell1",
                adapter="aishell1",
                root="aishell1",
                expected_sr=16000,  # AISHELL-1 原始錄音的取樣率（語料的性質，不是模型的）
            ),
            dict(
                name="wenetspeech",
                registry="wenetspeech",
                adapter="wenetspeech",
                root="wenetspeech",
                train_subset="M",
            ),
            dict(
                name="magicdata_ramc",
                registry="magicdata_ramc",
                adapter="magicdata_ramc",
                root="magicdata_ramc",
            ),
            dict(
                name="commonvoice_zh_cn",
                registry="commonvoice_zh_cn",
                adapter="commonvoice",
                root="commonvoice_zh_cn",
                locale="zh-CN",
            ),
            dict(
                name="commonvoice_zh_tw",
                registry="commonvoice_zh_tw",
                adapter="commonvoice",
                root="commonvoice_zh_tw",
                locale="zh-TW",
            ),
            dict(name="kespeech", registry="kespeech", adapter="kaldi", root="kespeech"),
            dict(name="talcs", registry="talcs", adapter="kaldi", root="talcs"),
        ],
    )
