"""Qwen2／Qwen2.5 因果語言模型（Flax NNX）。

與 `transformers.Qwen2ForCausalLM` 數值一致：RMSNorm、RoPE（rotate_half 慣例）、
GQA、q/k/v 帶偏置而 o_proj 不帶、SwiGLU MLP、綁定或獨立的 lm_head。

設計重點：
- 注意力、遮罩、RoPE 與 KV 快取在 `speakllm_jax.models.attention`，層堆疊（`scan_layers`、
  `remat`）在 `speakllm_jax.models.stack`，貪婪解碼 `generate` 在 `speakllm_jax.models.sampling`；
  HF `config.json` 的轉換在 `speakllm_jax.checkpoints.qwen2_hf`。
- 每個參數帶邏輯軸名稱（見 `speakllm_jax.models.axis_rules.AXES`），分片由規則表決定。
- 計算精度為 `cfg.dtype`（支援 bf16），注意力的 softmax 與正規化一律以 fp32 計算。
- `forward_embeds` 回傳新的快取（純函數式），因此可以整段放進 `jax.jit`／`lax` 迴圈。
- 有填充（左填充）時位置由遮罩累加得到，與 `transformers` 的 `generate` 相同。
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.attention import (
    Attention,
    KVCache,
    LayerKV,
    apply_rope,
    positions_from_mask,
    rope_cos_sin,
    self_attention_mask,
)
from speakllm_jax.models.layers import RMSNorm, dense, embedding, remat_policy
from speakllm_jax.models.lora import LoRALinear
from speakllm_jax.models.sampling import generate
from speakllm_jax.models.stack import run_layers, stack_layers

# 舊的匯入路徑（`from speakllm_jax.models.qwen2 import generate, KVCache, …`）仍可用。
__all__ = [
    "KVCache",
    "Qwen2Config",
    "Qwen2DecoderLayer",
    "Qwen2ForCausalLM",
    "Qwen2MLP",
    "apply_rope",
    "generate",
    "positions_from_mask",
    "rope_cos_sin",
]


def _as_dtype(d: Any) -> Any:
    """把字串或型別統一成 `jnp.dtype`（可雜湊，可比較）。"""
    return jnp.dtype(d)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Qwen2 結構設定；欄位名稱沿用 HF `config.json`（轉換見 `checkpoints.qwen2_hf`）。

    `dtype` 為計算精度、`param_dtype` 為參數精度；`remat` 為 `layers.REMAT_POLICIES`
    中的策略名稱；`hf_extra` 保存檢查點設定中本類別不使用的欄位（例如 `eos_token_id`），
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
        """Qwen2.5-0.5B（CosyVoice2 的 LM 主幹）的結構：即本類別的預設值。"""
        return cls(**kw)


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
        return LoRALinear(in_f, out_f, axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha, **kw)
    return dense(in_f, out_f, axes, **kw)


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
    """前置 RMSNorm 的解碼層：GQA 注意力（q/k/v 帶偏置、o_proj 不帶）與 MLP 各帶殘差。"""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            bias=(True, True, True, False),
            out_name="o_proj",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            proj=lambda name, i, o, axes, use_bias: _proj(
                cfg, name, i, o, axes, use_bias=use_bias, rngs=rngs
            ),
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = Qwen2MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        kv: LayerKV | None = None,
        slot: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        h, kv = self.self_attn(self.input_layernorm(x), mask, rope=rope, kv=kv, slot=slot)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 因果語言模型。

    參數路徑（亦是 HF 鍵對應的依據）：`embed_tokens.embedding`、
    `layers.{self_attn,mlp,input_layernorm,post_attention_layernorm}...`（第 0 軸為層）、
    `norm.weight`、（未綁定時）`lm_head.kernel`。
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.embed_tokens = embedding(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )

        self.layers = stack_layers(
            lambda r: Qwen2DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs
        )
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
        sinks = 0
        if window is not None:
            sinks, w = int(window[0]), int(window[1])
            if sinks < 0 or w < 1:
                raise ValueError(f"window=(sinks, w) 需要 sinks ≥ 0、w ≥ 1，收到 {window}")
            max_len = sinks + w
        return KVCache.create(
            cfg.num_hidden_layers,
            batch,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype if dtype is not None else cfg.dtype,
            ring=window is not None,
            sinks=sinks,
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
        if cache is not None and cache.ring and t != 1:
            raise ValueError(f"環狀 KV 快取一次只能前進 1 個詞，收到 {t}")
        x = embeds.astype(cfg.dtype)
        valid = (
            jnp.ones((b, t), jnp.bool_)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.bool_)
        )
        if positions is None:
            positions = positions_from_mask(valid, 0 if cache is None else cache.next_pos)
        mask, key_valid = self_attention_mask(valid, cache, window if cache is None else None)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        slot = None if cache is None else cache.write_slot()

        def body(
            layer: Qwen2DecoderLayer, h: jax.Array, kv: LayerKV | None
        ) -> tuple[jax.Array, LayerKV | None]:
            return layer(h, rope, mask, kv, slot)

        xs = None if cache is None else (cache.k, cache.v)
        x, kv = run_layers(self.layers, body, x, xs, scan=cfg.scan_layers, remat=cfg.remat)
        new_cache = None if cache is None else cache.advanced(kv[0], kv[1], key_valid, valid)
        return self.norm(x), new_cache
