"""本專案雙聲道對話格式（`{id}.json` + 立體聲音檔）的 tfds 建構器，輸出 ArrayRecord。

對話只重取樣、不切分，兩個聲道與 turns／overlaps 原樣保留。

    python data/build_tfds.py speakllm_dialogue --manual_dir DIR [--data_dir DIR]
"""

from speakllm_jax.data.tfds_builders.base import ChainBuilder


class Builder(ChainBuilder):
    """speakllm_dialogue：依每段對話的 split 欄分切分。"""

    ADAPTER = "dialogue"
    CORPUS = "dialogue"
    CHAIN = {"max_seconds": 600.0}
