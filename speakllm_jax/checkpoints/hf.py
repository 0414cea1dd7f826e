"""Hugging Face 檢查點的公開入口。

讀取官方資料夾（config.json + safetensors，單檔或分片）直接載入 NNX 模型，
並可存回 `transformers` `from_pretrained` 能讀的資料夾。
"""

from speakllm_jax.checkpoints.qwen2_hf import load_qwen2, save_qwen2
from speakllm_jax.checkpoints.whisper_hf import load_whisper, save_whisper

__all__ = ["load_qwen2", "save_qwen2", "load_whisper", "save_whisper"]
