"""第 1 階段：語音指令 SFT。訓練連接器、Qwen 的 LoRA（或全部，依 `trainable`）、語音頭與聲調頭。

語音指令配對排成「使用者說 → 停頓 → 助理答」的雙聲道對話，使用與第 2 階段相同的全雙工幀模型；
損失為文字（語義尺度）＋語音碼（聲學尺度）＋聲調輔助（＋輪替）。
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`：`preset=tiny|full`（或只寫預設名稱），見 `configs.base.parse_arg`。"""
    preset = parse_arg(arg, preset="tiny").preset
    c = base_config(preset)
    c.phase = "phase1_sft"
    c.task = "duplex"
    c.model.speech_head = "voila"
    c.data.duplex_sets = "instructions"
    c.data.max_frames = 384
    c.train.batch_size = 4
    c.trainable = (
        "connector/.*",
        "audio_embed/.*",
        "speech_head/.*",
        "tone_embed/.*",
        "tone_head/.*",
        "turn_head/.*",
        "llm/.*lora_[ab]",
    )
    # Qwen 本體凍結，只訓練注意力與 MLP 投影上的 LoRA（匯出時合併）。
    c.lora.enabled = True
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return c
