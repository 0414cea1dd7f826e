"""內建示範語料（`python data/make_demo_corpus.py --output_dir demo_corpus`）的清單設定。

各語料登記在登錄表名稱 `demo` 之下：`python data/download.py --config configs/data/demo.py
--local demo=DIR` 登記本機副本後，`build_manifests` 改讀 `DIR/<subdir>`；沒登記時讀
`data_root/<root>`。不加 `--local` 時 `download.py` 直接在 `data_root` 離線生成示範語料。
"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config
from speakllm_jax.data.demo_corpus import DEMO_DIR

_CORPORA = (
    ("aishell1", "aishell1", "aishell"),
    ("commonvoice", "commonvoice", "commonvoice/cv-corpus-0.0-demo"),
    ("demo_dialogue", "dialogue", "dialogues"),
    ("demo_instructions", "instructions", "instructions"),
    ("demo_longform", "vad_truth", "vad"),
)


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "demo",
        [
            dict(name=name, adapter=adapter, root=root, registry="demo", subdir=root)
            for name, adapter, root in _CORPORA
        ],
        data_root=DEMO_DIR,
        check_audio="full",
    )
