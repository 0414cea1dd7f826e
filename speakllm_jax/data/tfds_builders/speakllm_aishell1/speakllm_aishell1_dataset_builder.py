"""AISHELL-1（`data_aishell/wav/{split}/S*/…` 與 transcript）的 tfds 建構器，輸出 ArrayRecord。

python data/build_tfds.py speakllm_aishell1 --manual_dir /data/aishell [--data_dir DIR]
"""

from speakllm_jax.data.tfds_builders.base import ChainBuilder


class Builder(ChainBuilder):
    """speakllm_aishell1：train／dev／test。"""

    ADAPTER = "aishell1"
    CORPUS = "aishell1"
    NUM_SHARDS = 64
