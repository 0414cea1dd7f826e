"""第 2 階段的輪替配方：在輪替示範對話（`make_demo_corpus.py --dialogues N`）上學會輪替頭與
重疊感知目標；tiny 預設在 2 核 CPU 上 30 分鐘內訓練完（`--config phase2_turns:preset=full` 為同一配方的全尺寸）。

資料：`data.train_manifests` 給輪替對話的 train 切分、`data.codes_dirs` 給助理聲道的語音碼
（`data/extract_speech_tokens.py --channel 1`），`data.eval_manifests` 給 dev 切分。
訓練什麼、為什麼，見 `docs/training_schedule.md` 的「輪替配方」。
"""

from __future__ import annotations

import ml_collections

from configs.base import parse_arg
from configs.phase2_duplex import get_config as phase2
from speakllm_jax.labels import TurnAction


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`：`preset=tiny|full`（或只寫預設名稱），見 `configs.base.parse_arg`。"""
    preset = parse_arg(arg, preset="tiny").preset
    c = phase2(preset)
    c.phase = "phase2_turns"
    c.data.duplex_sets = "dialogue"
    # 輪替示範對話最長約 25 秒（625 幀）。
    c.data.max_frames = 640
    c.train.batch_size = 2
    c.train.steps = 600 if preset == "tiny" else 20000
    c.train.log_every = 10
    c.train.eval_every = 0
    c.checkpoint.every_steps = 100 if preset == "tiny" else 1000
    c.optim.warmup_steps = 20 if preset == "tiny" else 500
    # 輪替為主：文字計畫與語音碼仍訓練（給輪替頭時間脈絡），權重較低。
    c.loss.text = 0.5
    c.loss.code = 0.25
    c.loss.turn = 1.0
    # SPEAK 每輪只有一幀、YIELD 每次搶話 reaction_frames 幀：類別權重抵銷稀少（TurnAction 順序）。
    weights = {TurnAction.SPEAK: 8.0, TurnAction.YIELD: 4.0}
    c.loss.turn_classes = tuple(float(weights.get(a, 1.0)) for a in TurnAction)
    if preset == "tiny":
        # tiny 的 Whisper 是隨機初始化的：編碼器也要學會聽出停頓、語尾與搶話。
        c.trainable = tuple(c.trainable) + ("encoder/.*",)
    return c
