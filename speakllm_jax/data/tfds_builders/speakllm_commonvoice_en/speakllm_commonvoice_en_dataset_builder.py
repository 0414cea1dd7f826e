"""Common Voice 英文的 tfds 建構器，輸出 ArrayRecord（文字不做繁簡轉換）。

python data/build_tfds.py speakllm_commonvoice_en --manual_dir /data/cv-corpus-XX [--data_dir DIR]
"""

from speakllm_jax.data.tfds_builders.base import ChainBuilder


class Builder(ChainBuilder):
    """speakllm_commonvoice_en：train／dev／test。"""

    ADAPTER = "commonvoice"
    CORPUS = "commonvoice_en"
    LOCATIONS = (("en", {}),)
    CHAIN = {"conversion": None}
    NUM_SHARDS = 64
