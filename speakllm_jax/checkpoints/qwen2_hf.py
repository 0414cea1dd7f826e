"""Qwen2／Qwen2.5 的 Hugging Face 檢查點讀寫。

官方資料夾（`config.json` 加上單檔或分片的 safetensors，fp32/bf16/fp16）直接載入
`speakllm_jax.models.qwen2.Qwen2ForCausalLM`；存回的資料夾可由
`transformers.Qwen2ForCausalLM.from_pretrained` 讀取。堆疊層的每個參數對應到
各層的 HF 鍵（`model.layers.{i}....`），線性層權重轉置（HF `[out, in]` ↔ NNX `[in, out]`）。
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.checkpoints.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    KeyMap,
    ParamMap,
    load_params,
    read_config,
    save_params,
    stacked_keys,
    transposed,
)
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from speakllm_jax.models.sharding import DEFAULT_RULES

# 檢查點中允許存在但不載入的鍵：舊版存檔的 RoPE 緩衝區。
_IGNORE_ALWAYS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\..*")

_LINEARS = (
    ("self_attn.q_proj", True),
    ("self_attn.k_proj", True),
    ("self_attn.v_proj", True),
    ("self_attn.o_proj", False),
    ("mlp.gate_proj", False),
    ("mlp.up_proj", False),
    ("mlp.down_proj", False),
)


def qwen2_key_map(cfg: Qwen2Config) -> KeyMap:
    """NNX 參數路徑 → HF 鍵的對應表。"""
    n = cfg.num_hidden_layers

    def per_layer(name: str) -> tuple[str, ...]:
        return stacked_keys("model.layers.{i}." + name, n)

    km: dict[str, Any] = {
        "embed_tokens.embedding": ParamMap("model.embed_tokens.weight"),
        "norm.weight": ParamMap("model.norm.weight"),
        "layers.input_layernorm.weight": ParamMap(per_layer("input_layernorm.weight")),
        "layers.post_attention_layernorm.weight": ParamMap(
            per_layer("post_attention_layernorm.weight")
        ),
    }
    for name, has_bias in _LINEARS:
        km[f"layers.{name}.kernel"] = transposed(per_layer(f"{name}.weight"))
        if has_bias:
            km[f"layers.{name}.bias"] = ParamMap(per_layer(f"{name}.bias"))
    if not cfg.tie_word_embeddings:
        km["lm_head.kernel"] = transposed("lm_head.weight")
    return km


def abstract_qwen2(cfg: Qwen2Config) -> Qwen2ForCausalLM:
    """只有形狀、不配置記憶體的模型（`nnx.eval_shape`）。"""
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))


def load_qwen2(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    **overrides: Any,
) -> Qwen2ForCausalLM:
    """由 HF 資料夾載入 Qwen2 模型。

    `dtype` 是計算精度，也是參數精度的預設值（可以 `param_dtype=` 另外指定，例如 bf16
    計算、fp32 主權重）。其餘 `overrides` 覆寫 `Qwen2Config` 的欄位（例如 `remat`）。
    給了 `mesh` 時，各參數依邏輯軸規則（`rules`，預設 `DEFAULT_RULES`）逐一分片放置，
    不會在單一裝置上組出整個模型。綁定詞嵌入時，檢查點中多出的 `lm_head.weight` 會被忽略。
    """
    cfg_dict = read_config(path)
    overrides = dict(overrides)
    param_dtype = overrides.pop("param_dtype", dtype)
    try:
        cfg = Qwen2Config.from_hf_dict(cfg_dict, dtype=dtype, param_dtype=param_dtype, **overrides)
    except ValueError as e:
        raise ValueError(f"{Path(path) / 'config.json'}：{e}") from e
    ignore = list(_IGNORE_ALWAYS)
    if cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")
    return load_params(
        abstract_qwen2(cfg),
        qwen2_key_map(cfg),
        path,
        dtype=cfg.param_dtype,
        mesh=mesh,
        rules=DEFAULT_RULES if rules is None else rules,
        ignore=ignore,
    )


def save_qwen2(
    model: Qwen2ForCausalLM,
    path: str | os.PathLike,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """把模型存成 `transformers.Qwen2ForCausalLM.from_pretrained` 可讀的資料夾。

    `dtype` 給定時浮點參數轉成該型別存檔（config.json 的 `dtype` 同步）；
    超過 `max_shard_bytes` 時分片並寫出 `model.safetensors.index.json`。
    有 LoRA 時先在副本上合併（`merge_lora`），存出的是合併後的權重，原模型不變。
    """
    cfg: Qwen2Config = model.cfg
    if cfg.lora_rank > 0 and cfg.lora_targets:
        from speakllm_jax.models.lora import merge_lora

        model = merge_lora(nnx.clone(model))
    return save_params(
        model,
        qwen2_key_map(cfg),
        path,
        config=cfg.to_hf_dict(torch_dtype=dtype),
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
    )
