"""SpeakLLM-JAX：中文優先的全雙工語音大模型研究程式庫。

在 TPU／CPU 上以 JAX 與 Flax NNX 訓練，匯出至 PyTorch 於 GPU 上服務。
匯入本套件本身不匯入 JAX／Flax，所以不需要 JAX 的子模組（`cli`、`audio.io`、`text`）可單獨使用。
"""

import importlib as _importlib
import os as _os
import sys as _sys

from speakllm_jax.cpu_simulation import widen_cpu_thread_pool as _widen

# 模擬多裝置時放大 XLA CPU 執行緒池（要在 JAX 建立後端之前）。
_widen()

# 參數只帶邏輯軸名稱的中繼資料，建立時不立即分片；分片一律由 `speakllm_jax.models.sharding` 依規則表
# 對應到網格。Flax 尚未匯入時只設它匯入時讀取的環境變數，不在此匯入 Flax；已匯入時直接設定。
if "flax" in _sys.modules:
    # 只在 Flax 已由呼叫端載入時才取用它（此時 JAX 也已載入），所以本套件不會帶入 Flax。
    _importlib.import_module("flax.nnx").use_eager_sharding(False)
else:
    _os.environ["FLAX_ALWAYS_SHARD_VARIABLE"] = "false"

__version__ = "0.1.0"
