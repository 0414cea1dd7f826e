"""SpeakLLM-JAX：中文優先的全雙工語音大模型研究程式庫。

在 TPU／CPU 上以 JAX 與 Flax NNX 訓練，匯出至 PyTorch 於 GPU 上服務。
匯入本套件沒有副作用（不改環境變數、不匯入 JAX／Flax）；需要 JAX 的入口在建立後端之前呼叫
`speakllm_jax.cpu_simulation.configure_cpu_simulation()`。
"""

__version__ = "0.1.0"
