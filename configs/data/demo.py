"""內建示範語料（python data/make_demo_corpus.py --output_dir data/demo）的清單設定。"""

from __future__ import annotations

import ml_collections

from configs.data._common import data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config(
        "demo",
        [
            dict(name="aishell1", adapter="aishell1", root="aishell"),
            dict(name="commonvoice", adapter="commonvoice", root="commonvoice/cv-corpus-0.0-demo"),
            dict(name="demo_dialogue", adapter="dialogue", root="dialogues"),
            dict(name="demo_instructions", adapter="instructions", root="instructions"),
            dict(name="demo_longform", adapter="vad_truth", root="vad"),
        ],
        data_root="data/demo",
        check_audio="full",
    )
