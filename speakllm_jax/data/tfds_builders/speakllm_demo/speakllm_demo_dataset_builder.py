"""示範語料（AISHELL-1 版面的 espeak-ng 合成語音）的 tfds 建構器，輸出 ArrayRecord。

    python data/build_tfds.py speakllm_demo [--manual_dir DEMO_CORPUS/aishell] [--data_dir DIR]
    .venv-tfds/bin/tfds build speakllm_jax/data/tfds_builders/speakllm_demo --file_format array_record

沒有 `--manual_dir` 時在資料目錄旁離線生成示範語料（需要 espeak-ng）。
"""

from speakllm_jax.data.tfds_builders.base import ChainBuilder


class Builder(ChainBuilder):
    """speakllm_demo：示範語料的 train／dev／test。"""

    ADAPTER = "aishell1"
    CORPUS = "aishell1"
    DEMO_SUBDIR = "aishell"
