"""SpeakLLM-JAX：中文優先的全雙工語音大模型研究程式庫。

在 TPU／CPU 上以 JAX 與 Flax NNX 訓練，匯出至 PyTorch 於 GPU 上服務。
"""

from speakllm_jax.cpu_simulation import widen_cpu_thread_pool as _widen

# 模擬多裝置時放大 XLA CPU 執行緒池（要在 JAX 建立後端之前）。
_widen()

# 這裡不匯入 jax／flax：服務端（PyTorch）會匯入 `speakllm_jax.audio.features` 的 numpy 部分。
# Flax 的全域設定在 `speakllm_jax.models` 匯入時設定（所有 NNX 模組都在那裡建立）。

__version__ = "0.1.0"
