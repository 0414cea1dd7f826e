"""訓練：網格與邏輯分片、訓練狀態、損失、訓練迴圈。"""

from speakllm_jax import configure_flax

configure_flax()
