"""模型：Whisper、Qwen2、連接器與語音頭，皆以 Flax NNX 撰寫。"""

from flax import nnx as _nnx

# 參數只帶邏輯軸名稱的中繼資料，建立時不立即分片；
# 分片一律由 `speakllm_jax.training.sharding` 依規則表對應到網格。
_nnx.use_eager_sharding(False)
