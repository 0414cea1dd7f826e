"""檢查點：Hugging Face safetensors 與 Orbax 的讀寫。"""

from speakllm_jax import configure_flax

configure_flax()
