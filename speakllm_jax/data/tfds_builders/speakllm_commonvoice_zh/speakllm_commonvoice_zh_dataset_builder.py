"""Common Voice 中文（zh-CN、zh-TW、zh-HK，繁體轉簡體）的 tfds 建構器，輸出 ArrayRecord。

python data/build_tfds.py speakllm_commonvoice_zh --manual_dir /data/cv-corpus-XX [--data_dir DIR]
"""

from speakllm_jax.data.tfds_builders.base import ChainBuilder


class Builder(ChainBuilder):
    """speakllm_commonvoice_zh：train／dev／test（有哪些語言資料夾就讀哪些）。"""

    ADAPTER = "commonvoice"
    CORPUS = "commonvoice_zh"
    LOCATIONS = (("zh-CN", {}), ("zh-TW", {}), ("zh-HK", {}))
    NUM_SHARDS = 64
