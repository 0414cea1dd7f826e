"""Qwen2／Qwen2.5 因果語言模型（Flax NNX）。

與 `transformers.Qwen2ForCausalLM` 數值一致：RMSNorm、RoPE（rotate_half 慣例）、
GQA、q/k/v 帶偏置而 o_proj 不帶、SwiGLU MLP、綁定或獨立的 lm_head。

設計重點：
- 各層以 `nnx.vmap` 建立成堆疊參數（前綴軸名 `"layers"`），前向以 `nnx.scan`
  逐層執行；`scan_layers=False` 時同一份堆疊參數以展開的迴圈執行（檢查點格式不變）。
- 每個參數帶邏輯軸名稱（見 `speakllm_jax.models.layers.AXES`），分片由規則表決定。
- 計算精度為 `cfg.dtype`（支援 bf16），注意力的 softmax 與正規化一律以 fp32 計算。
- KV 快取是純函數式的 pytree（`KVCache`），由 `forward_embeds` 回傳新的快取，
  因此可以整段放進 `jax.jit`／`lax` 迴圈。
- 有填充（左填充）時位置由遮罩累加得到，與 `transformers` 的 `generate` 相同。
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.models.layers import (
    RMSNorm,
    constrain,
    dense,
    maybe_remat,
    partitioned,
    remat_policy,
)

# 層與層之間活化值的邏輯軸：批次沿 (data, fsdp) 切，其餘複製。
ACT_AXES = ("batch", "length", None)

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


def _as_dtype(d: Any) -> Any:
    """把字串或型別統一成 `jnp.dtype`（可雜湊，可比較）。"""
    return jnp.dtype(d)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 結構設定；欄位名稱沿用 HF `config.json`。

    `dtype` 為計算精度、`param_dtype` 為參數精度；`remat` 為 `layers.REMAT_POLICIES`
    中的策略名稱；`hf_extra` 保存 HF 設定中本類別不使用的欄位（例如 `eos_token_id`），
    以 `(鍵, JSON 字串)` 的元組存放，讓設定保持可雜湊並能原樣寫回。
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    hf_extra: tuple[tuple[str, str], ...] = ()
    # LoRA（不寫入 HF config.json）：秩為 0 表示不使用；目標為投影名稱（q_proj、up_proj…）。
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "dtype", _as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} 不能被 num_attention_heads "
                f"{self.num_attention_heads} 整除"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} 不能被 num_key_value_heads "
                f"{self.num_key_value_heads} 整除"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} 必須是偶數（RoPE 需要）")
        remat_policy(self.remat)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **kw: Any) -> Qwen2Config:
        return dataclasses.replace(self, **kw)

    @classmethod
    def qwen2_5_7b(cls, **kw: Any) -> Qwen2Config:
        """Qwen2.5-7B（及 -Instruct）的結構。"""
        base = dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=32768,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def qwen2_5_0_5b(cls, **kw: Any) -> Qwen2Config:
        """Qwen2.5-0.5B（CosyVoice2 的 LM 主幹）的結構。"""
        base = dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Qwen2Config:
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
        return cls(**kw)

    def to_hf_dict(self, torch_dtype: Any = None) -> dict[str, Any]:
        """輸出 `transformers.Qwen2Config` 可讀的 `config.json` 內容。

        `torch_dtype` 為存檔的參數型別（預設 `param_dtype`）。
        """
        dt = jnp.dtype(torch_dtype if torch_dtype is not None else self.param_dtype).name
        d: dict[str, Any] = {k: json.loads(v) for k, v in self.hf_extra}
        d.update(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            attention_dropout=0.0,
            initializer_range=0.02,
            use_cache=True,
            dtype=dt,
            torch_dtype=dt,
        )
        return d


# ---------------------------------------------------------------- KV 快取


@flax.struct.dataclass
class KVCache:
    """逐步解碼用的 KV 快取（pytree，可放進 jit 與 lax 迴圈）。

    `k`、`v`：`[layers, batch, max_len, kv_heads, head_dim]`；`valid`：`[batch, max_len]`
    標記哪些槽位是真實（非填充）的詞；`next_pos`：`[batch]` 每列下一個詞的 RoPE 位置；
    `index`：純量，已寫入的詞數（整批共用；非環狀時即下一次寫入的槽位）。

    `sinks`、`ring`（靜態）：`ring=True` 時為長對話的有界快取——前 `sinks` 個槽固定放最前面的
    詞（注意力槽），其餘 `max_len - sinks` 個槽是環狀的滑動視窗，新詞覆寫視窗中最舊的詞；
    RoPE 位置不重設，照 `next_pos` 一直增長（鍵以寫入時的位置旋轉後存放）。
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_pos: jax.Array
    index: jax.Array
    sinks: int = flax.struct.field(pytree_node=False, default=0)
    ring: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])


# ---------------------------------------------------------------- 基本運算


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """RoPE 的 cos/sin（fp32），形狀 `[batch, length, head_dim]`；與 HF 相同的前後半拼接。"""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x`：`[batch, length, heads, head_dim]`；cos/sin：`[batch, length, head_dim]`。"""
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + _rotate_half(x) * s


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """由 `[batch, length]` 的 1/0 遮罩得到位置：累加減一，填充處設為 1（同 HF）。"""
    mask = mask.astype(jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 1:
        start = start[:, None]
    pos = start + jnp.cumsum(mask, axis=-1) - 1
    return jnp.where(mask > 0, pos, 1)


_NEG_INF = -1e30


# ---------------------------------------------------------------- 模組


def _proj(
    cfg: Qwen2Config,
    name: str,
    in_f: int,
    out_f: int,
    axes: tuple[str, str],
    *,
    use_bias: bool,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """一般線性層，或在 `cfg.lora_targets` 中時的 `LoRALinear`（基底參數路徑相同）。"""
    kw = dict(use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.lora_rank > 0 and name in cfg.lora_targets:
        from speakllm_jax.models.lora import LoRALinear

        return LoRALinear(in_f, out_f, axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha, **kw)
    return dense(in_f, out_f, axes, **kw)


class Qwen2Attention(nnx.Module):
    """GQA 自注意力；q/k/v 帶偏置，o_proj 不帶。"""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dtype = cfg.dtype
        e, hd = cfg.hidden_size, cfg.head_dim
        h, kv = self.num_heads * hd, self.num_kv_heads * hd
        self.q_proj = _proj(cfg, "q_proj", e, h, ("embed", "heads"), use_bias=True, rngs=rngs)
        self.k_proj = _proj(cfg, "k_proj", e, kv, ("embed", "kv_heads"), use_bias=True, rngs=rngs)
        self.v_proj = _proj(cfg, "v_proj", e, kv, ("embed", "kv_heads"), use_bias=True, rngs=rngs)
        self.o_proj = _proj(cfg, "o_proj", h, e, ("heads", "embed"), use_bias=False, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        bias: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`bias`：`[batch, 1, q_len, k_len]` 的加性遮罩（fp32）。

        給了 `kv`（此層快取 `[batch, max_len, kv_heads, head_dim]`）時，新的 k/v 寫入
        `index` 起的槽位，注意力看整段快取，並回傳更新後的 `kv`。
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            ck, cv = kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_kv = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        g = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, g, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim**-0.5) + bias[:, :, None, :, :]
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = out.reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), new_kv


class Qwen2MLP(nnx.Module):
    """SwiGLU：`down(silu(gate(x)) * up(x))`，皆無偏置。"""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _proj(cfg, "gate_proj", e, m, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.up_proj = _proj(cfg, "up_proj", e, m, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.down_proj = _proj(cfg, "down_proj", m, e, ("mlp", "embed"), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    """前置 RMSNorm 的解碼層：注意力與 MLP 各帶殘差。"""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = Qwen2MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        bias: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, bias, kv, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


def _layer_no_cache(
    layer: Qwen2DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array
) -> jax.Array:
    x = constrain(x, ACT_AXES)
    return constrain(layer(x, cos, sin, bias)[0], ACT_AXES)


def _layer_with_cache(
    layer: Qwen2DecoderLayer,
    x: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    bias: jax.Array,
    index: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    x, kv = layer(x, cos, sin, bias, (k, v), index)
    return x, kv


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 因果語言模型。

    參數路徑（亦是 HF 鍵對應的依據）：`embed_tokens.embedding`、
    `layers.{self_attn,mlp,input_layernorm,post_attention_layernorm}...`（第 0 軸為層）、
    `norm.weight`、（未綁定時）`lm_head.kernel`。
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> Qwen2DecoderLayer:
            return Qwen2DecoderLayer(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )
        else:
            self.lm_head = None

    # ---------------------------------------------------------------- 公開 API

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """詞嵌入 `[batch, length] → [batch, length, hidden]`（計算精度）。"""
        return self.embed_tokens(input_ids).astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """最終隱狀態 → 詞表 logits（fp32）。"""
        if self.lm_head is None:
            out = self.embed_tokens.attend(hidden.astype(self.cfg.dtype))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def init_cache(
        self,
        batch: int,
        max_len: int,
        dtype: Any = None,
        window: tuple[int, int] | None = None,
    ) -> KVCache:
        """建立空的 KV 快取（預設為計算精度）。

        `window=(sinks, w)` 時建立有界的環狀快取（`sinks + w` 個槽，忽略 `max_len`）：
        每一步看最前面 `sinks` 個詞與含自己在內最近的 `w` 個詞，與整段前向的
        `forward_embeds(..., window=(sinks, w))` 相同。
        """
        cfg = self.cfg
        ring = window is not None
        if ring:
            sinks, w = int(window[0]), int(window[1])
            if sinks < 0 or w < 1:
                raise ValueError(f"window=(sinks, w) 需要 sinks ≥ 0、w ≥ 1，收到 {window}")
            max_len = sinks + w
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        dt = dtype if dtype is not None else cfg.dtype
        return KVCache(
            k=jnp.zeros(shape, dt),
            v=jnp.zeros(shape, dt),
            valid=jnp.zeros((batch, max_len), jnp.bool_),
            next_pos=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            sinks=int(window[0]) if ring else 0,
            ring=ring,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """完整前向：`input_ids [batch, length]` → logits `[batch, length, vocab]`（fp32）。"""
        hidden, _ = self.forward_embeds(self.embed(input_ids), attention_mask, positions)
        return self.logits(hidden)

    def forward_embeds(
        self,
        embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        window: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """由輸入嵌入前向，回傳（最終正規化後的隱狀態, 更新後的快取或 None）。

        `attention_mask`：`[batch, length]` 的 1/0（0 為填充）。`positions` 未給時由遮罩
        累加得到（有快取時接續 `cache.next_pos`）。給了 `cache` 時，這一段寫入快取中
        `cache.index` 起的槽位，並可看見快取中先前所有有效的槽位；呼叫端須確保
        `cache.index + length <= cache.max_len`（在 jit 中索引是動態值，超出時無法檢查）。
        `window=(sinks, w)`（無快取時）：第 i 個槽只看 `j < sinks` 或 `i - j < w` 的槽
        （注意力槽加滑動視窗）；環狀快取（`init_cache(..., window=...)`）一次只能前進一個詞。
        """
        cfg = self.cfg
        b, t, _ = embeds.shape
        if cache is not None and t > cache.max_len:
            raise ValueError(f"輸入長度 {t} 超過 KV 快取長度 {cache.max_len}")
        x = embeds.astype(cfg.dtype)
        mask = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.bool_)
        )
        write = None
        if cache is None:
            if positions is None:
                positions = positions_from_mask(mask)
            key_valid = mask
            q_slot = jnp.arange(t)
            k_slot = jnp.arange(t)
        elif cache.ring:
            if t != 1:
                raise ValueError(f"環狀 KV 快取一次只能前進 1 個詞，收到 {t}")
            if positions is None:
                positions = positions_from_mask(mask, cache.next_pos)
            s_, w_ = cache.sinks, cache.max_len - cache.sinks
            write = jnp.where(cache.index < s_, cache.index, s_ + (cache.index - s_) % w_)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, write))
            q_slot = jnp.full((1,), cache.max_len)
            k_slot = jnp.arange(cache.max_len)
        else:
            if positions is None:
                positions = positions_from_mask(mask, cache.next_pos)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            q_slot = cache.index + jnp.arange(t)
            k_slot = jnp.arange(cache.max_len)
        allowed = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]
        if window is not None and cache is None:
            near = (k_slot[None, :] < window[0]) | (q_slot[:, None] - k_slot[None, :] < window[1])
            allowed = allowed & near[None]
        bias = jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)[:, None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        unroll: int | bool = 1 if cfg.scan_layers else True
        meta = {nnx.PARTITION_NAME: "layers"}
        if cache is None:
            fn = maybe_remat(_layer_no_cache, cfg.remat)
            scan = nnx.scan(
                fn,
                in_axes=(0, nnx.Carry, None, None, None),
                out_axes=nnx.Carry,
                unroll=unroll,
                transform_metadata=meta,
            )
            x = scan(self.layers, x, cos, sin, bias)
            new_cache = None
        else:
            fn = maybe_remat(_layer_with_cache, cfg.remat)
            scan = nnx.scan(
                fn,
                in_axes=(0, nnx.Carry, 0, 0, None, None, None, None),
                out_axes=(nnx.Carry, 0),
                unroll=unroll,
                transform_metadata=meta,
            )
            slot = cache.index if write is None else write
            x, (k, v) = scan(self.layers, x, cache.k, cache.v, cos, sin, bias, slot)
            new_cache = KVCache(
                k=k,
                v=v,
                valid=key_valid,
                next_pos=cache.next_pos + jnp.sum(mask, axis=-1, dtype=jnp.int32),
                index=cache.index + t,
                sinks=cache.sinks,
                ring=cache.ring,
            )
        return self.norm(x), new_cache


# ---------------------------------------------------------------- 產生


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_jit(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_id: jax.Array,
    pad_id: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`eos_id` 為 -1 表示不設結束詞；兩者皆為動態值，換詞不需重新編譯。"""
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    cache = model.init_cache(b, t + max_new_tokens)
    hidden, cache = model.forward_embeds(model.embed(input_ids), attention_mask, cache=cache)
    tok = jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(input_ids.dtype)
    done = (eos_id >= 0) & (tok == eos_id)
    out = jnp.zeros((b, max_new_tokens), input_ids.dtype).at[:, 0].set(tok)
    all_done_at = jnp.full((), max_new_tokens, jnp.int32)
    all_done_at = jnp.where(jnp.all(done), 1, all_done_at)

    # 參數狀態放進迴圈的 carry（原樣傳回），讓 NNX 在迴圈內的追蹤層級合併模組。
    def step(i: jax.Array, carry: tuple) -> tuple:
        params, cache, tok, done, out, all_done_at = carry
        m = nnx.merge(graphdef, params)
        hidden, cache = m.forward_embeds(m.embed(tok[:, None]), cache=cache)
        nxt = jnp.argmax(m.logits(hidden[:, -1]), axis=-1).astype(tok.dtype)
        nxt = jnp.where(done, pad_id.astype(tok.dtype), nxt)
        done = done | ((eos_id >= 0) & (nxt == eos_id))
        out = out.at[:, i].set(nxt)
        all_done_at = jnp.where(jnp.all(done) & (all_done_at == max_new_tokens), i + 1, all_done_at)
        return params, cache, nxt, done, out, all_done_at

    carry = (state, cache, tok, done, out, all_done_at)
    carry = jax.lax.fori_loop(1, max_new_tokens, step, carry)
    return carry[4], carry[5]


def generate(
    model: Qwen2ForCausalLM,
    input_ids: Any,
    max_new_tokens: int,
    attention_mask: Any = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """貪婪解碼：先以 KV 快取預填提示，再在 `lax.fori_loop` 中逐詞解碼（整段 jit）。

    提示可左填充（`attention_mask` 為 0 處）。回傳 `[batch, length + 新詞數]` 的 numpy 陣列；
    與 `transformers` 相同，某列產生 `eos_id` 後其餘位置填 `pad_id`（預設為 `eos_id`），
    全部列都結束時截斷。
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens 必須至少為 1，收到 {max_new_tokens}")
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids 必須是 [batch, length]，收到形狀 {ids.shape}")
    mask = (
        jnp.ones(ids.shape, jnp.int32)
        if attention_mask is None
        else jnp.asarray(attention_mask, jnp.int32)
    )
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask 形狀 {mask.shape} 與 input_ids {ids.shape} 不符")
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(-1 if eos_id is None else int(eos_id), jnp.int32)
    out, n = _generate_jit(
        graphdef, state, ids, mask, int(max_new_tokens), eos, jnp.asarray(int(pad_id), jnp.int32)
    )
    new = np.asarray(out)[:, : int(n)]
    return np.concatenate([np.asarray(ids), new], axis=1)
