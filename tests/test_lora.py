"""LoRA：初始時輸出與原模型相同；訓練後合併進權重，前向不變，存出的 HF 資料夾是合併後的權重。"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from speakllm_jax.checkpoints.hf import load_qwen2, save_qwen2
from speakllm_jax.models.lora import LoRALinear, lora_param_count, merge_lora
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

TARGETS = ("q_proj", "v_proj", "up_proj")


def _cfg(**kw) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **kw,
    )


def test_lora_starts_equal_and_merges_exactly(tmp_path) -> None:
    base = Qwen2ForCausalLM(_cfg(), rngs=nnx.Rngs(0))
    lora = Qwen2ForCausalLM(
        _cfg(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS), rngs=nnx.Rngs(0)
    )
    # 基底參數路徑相同：把原模型權重放進 LoRA 模型。
    nnx.update(lora, nnx.state(base))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)))
    np.testing.assert_allclose(lora(ids), base(ids), atol=1e-6)
    assert isinstance(lora.layers.self_attn.q_proj, LoRALinear)
    assert not isinstance(lora.layers.self_attn.k_proj, LoRALinear)
    # 每層 q: 32·4+4·32，v: 32·4+4·16，up: 32·4+4·64。
    assert lora_param_count(lora) == 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16) + (32 * 4 + 4 * 64))

    # 模擬訓練：給 B 隨機值，輸出改變；合併後前向相同且 B 歸零。
    for _, m in nnx.iter_graph(lora):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = jax.random.normal(jax.random.key(1), m.lora_b[...].shape) * 0.1
    trained = np.asarray(lora(ids))
    assert np.abs(trained - np.asarray(base(ids))).max() > 1e-3
    save_qwen2(lora, tmp_path / "hf")
    merged = merge_lora(nnx.clone(lora))
    np.testing.assert_allclose(merged(ids), trained, atol=1e-5)

    # 存出的資料夾是合併後的權重：transformers 與我們的載入器都得到相同 logits。
    ref = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        pt = ref(torch.as_tensor(np.array(ids))).logits.numpy()
    np.testing.assert_allclose(pt, trained, atol=1e-4)
    np.testing.assert_allclose(load_qwen2(tmp_path / "hf")(ids), trained, atol=1e-5)


def test_lora_only_trainable_filter() -> None:
    from speakllm_jax.training.train_state import split_model

    model = Qwen2ForCausalLM(_cfg(lora_rank=2, lora_targets=TARGETS), rngs=nnx.Rngs(0))
    _, trainable, frozen = split_model(model, (".*lora_[ab]",))
    names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert len(names) == 2 * len(TARGETS)
