"""Qwen2／Qwen2.5 的 Hugging Face 檢查點讀寫。

官方資料夾（`config.json` 加上單檔或分片的 safetensors，fp32/bf16/fp16）直接載入
`speakllm_jax.models.qwen2.Qwen2ForCausalLM`；存回的資料夾可由
`transformers.Qwen2ForCausalLM.from_pretrained` 讀取。`config.json` 與 `Qwen2Config` 的轉換
（`qwen2_config_from_hf`／`qwen2_config_to_hf`）也在這裡，模型模組不認得 HF 的格式。堆疊層的每個參數對應到
各層的 HF 鍵（`model.layers.{i}....`），線性層權重轉置（HF `[out, in]` ↔ NNX `[in, out]`）。
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
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
from speakllm_jax.models.lora import merge_lora
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

# HF config.json 中由本設定直接表示、不需原樣保留的欄位。
_HF_KNOWN_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "hidden_act",
        "model_type",
        "architectures",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "layer_types",
        "attention_dropout",
        "use_cache",
        "initializer_range",
    }
)


def qwen2_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> Qwen2Config:
    """由 HF `config.json` 的內容建立設定；不支援的設定明確報錯。"""
    d = dict(d)
    model_type = d.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ValueError(f"config.json 的 model_type 為 {model_type!r}，預期 'qwen2'")
    required = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"config.json 缺少欄位 {missing}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json 的 hidden_act 為 {act!r}，只支援 'silu'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json 的 rope 類型 {rope_type!r} 不支援（只支援 default）")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if d.get("use_sliding_window", False):
        raise ValueError("config.json 的 use_sliding_window=true 不支援")
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) != int(d["hidden_size"]) // heads:
        raise ValueError(
            f"config.json 的 head_dim {head_dim} 與 hidden_size/num_attention_heads 不符"
        )
    extra = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in _HF_KNOWN_KEYS))
    kw: dict[str, Any] = dict(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        rope_theta=float(theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        hf_extra=extra,
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def qwen2_config_to_hf(cfg: Qwen2Config, torch_dtype: Any = None) -> dict[str, Any]:
    """輸出 `transformers.Qwen2Config` 可讀的 `config.json` 內容。

    `torch_dtype` 為存檔的參數型別（預設 `cfg.param_dtype`）。
    """
    dt = jnp.dtype(torch_dtype if torch_dtype is not None else cfg.param_dtype).name
    d: dict[str, Any] = {k: json.loads(v) for k, v in cfg.hf_extra}
    d.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=cfg.num_hidden_layers,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        dtype=dt,
        torch_dtype=dt,
    )
    return d


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
    給了 `mesh` 時，各參數依邏輯軸規則 `rules` 逐一分片放置，不會在單一裝置上組出整個模型；
    未給 `rules` 時用目前的規則表（訓練中為設定的 `logical_axis_rules`，否則 `DEFAULT_RULES`）。綁定詞嵌入時，檢查點中多出的 `lm_head.weight` 會被忽略。
    """
    cfg_dict = read_config(path)
    overrides = dict(overrides)
    param_dtype = overrides.pop("param_dtype", dtype)
    try:
        cfg = qwen2_config_from_hf(cfg_dict, dtype=dtype, param_dtype=param_dtype, **overrides)
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
        rules=rules,
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
        model = merge_lora(nnx.clone(model))
    return save_params(
        model,
        qwen2_key_map(cfg),
        path,
        config=qwen2_config_to_hf(cfg, torch_dtype=dtype),
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
    )
