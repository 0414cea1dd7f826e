"""Voila 式語音頭：LLM 每幀輸出一個隱狀態，深度 Transformer 依序產生該幀的多個碼本代碼。

事實（maitrix-org/Voila）：Voila-Tokenizer 為 25 Hz、4 個碼本、每個 2048 碼；LLM 以
`<au_token>` 佔位表示「這一幀是語音」，再由 4 層、寬 1024 的深度 Transformer 產生 4 個碼，
各碼本共用同一張代碼嵌入表與同一個輸出頭；一個語音幀在 LLM 端的輸入嵌入是其各碼嵌入的平均。

形狀：
- `DepthTransformer(h [B, N, d_llm], codes [B, N, Q]) → logits [B, N, Q, codebook_size]`
  （訓練時以教師強制平行計算：深度位置 0 的輸入是投影後的 h，位置 k 的輸入是代碼 k-1 的嵌入
  加上碼本位置嵌入；因果遮罩保證位置 k 只看到代碼 < k）。
- `SpeechCodeEmbedding(codes [B, N, Q], valid [B, N]) → [B, N, d_llm]`：Q 個碼本嵌入的平均。

深度 Transformer 直接重用 Qwen2 的層（RMSNorm、RoPE、SwiGLU），所以也能以 `nnx.scan`
堆疊、套用 remat 並沿用邏輯分片名稱。
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.layers import dense, partitioned
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@dataclass(frozen=True)
class SpeechHeadConfig:
    """語音頭設定。Voila 的實際值：4 碼本 × 2048、深度 4 層、寬 1024。"""

    num_codebooks: int = 4
    codebook_size: int = 2048
    depth_layers: int = 4
    depth_hidden: int = 1024
    depth_heads: int = 16
    depth_kv_heads: int = 16
    depth_intermediate: int = 2816

    def depth_qwen(self, dtype: Any, param_dtype: Any, remat: str, scan: bool) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=self.codebook_size,
            hidden_size=self.depth_hidden,
            intermediate_size=self.depth_intermediate,
            num_hidden_layers=self.depth_layers,
            num_attention_heads=self.depth_heads,
            num_key_value_heads=self.depth_kv_heads,
            rope_theta=10_000.0,
            tie_word_embeddings=False,
            max_position_embeddings=max(self.num_codebooks, 8),
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scan_layers=scan,
        )


class SpeechCodeEmbedding(nnx.Module):
    """每個碼本一張嵌入表（LLM 寬度）；一幀的嵌入為各碼嵌入的平均，無效幀為 0。"""

    def __init__(
        self, cfg: SpeechHeadConfig, d_model: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ) -> None:
        self.cfg = cfg
        self.dtype = dtype
        init = partitioned(nnx.initializers.normal(0.02), ("codebook", "vocab", "embed"))
        self.table = nnx.Param(
            init(rngs.params(), (cfg.num_codebooks, cfg.codebook_size, d_model), param_dtype)
        )

    def __call__(self, codes: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        q = self.cfg.num_codebooks
        table = self.table[...]
        # codes [B, N, Q] → 每個碼本各查自己的表。
        emb = jnp.stack([table[k][codes[..., k]] for k in range(q)], axis=-2)
        out = jnp.mean(emb.astype(jnp.float32), axis=-2)
        if valid is not None:
            out = out * valid[..., None].astype(out.dtype)
        return out.astype(self.dtype)


class DepthTransformer(nnx.Module):
    """逐幀產生 Q 個代碼的深度 Transformer（共用代碼嵌入與輸出頭）。"""

    def __init__(
        self,
        cfg: SpeechHeadConfig,
        d_model: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        self.cfg = cfg
        self.in_proj = dense(
            d_model,
            cfg.depth_hidden,
            ("embed", "mlp"),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.codebook_pos = nnx.Param(
            partitioned(nnx.initializers.normal(0.02), (None, "mlp"))(
                rngs.params(), (cfg.num_codebooks, cfg.depth_hidden), param_dtype
            )
        )
        # embed_tokens 是共用的代碼嵌入表，lm_head 是共用的代碼輸出頭。
        self.depth = Qwen2ForCausalLM(
            cfg.depth_qwen(dtype, param_dtype, remat, scan_layers), rngs=rngs
        )

    def _inputs(self, hidden: jax.Array, codes: jax.Array) -> jax.Array:
        """`hidden [M, d]`、`codes [M, Q]` → 深度序列輸入 `[M, Q, depth_hidden]`。"""
        q = self.cfg.num_codebooks
        first = self.in_proj(hidden)[:, None]
        prev = self.depth.embed(codes[:, : q - 1])
        seq = jnp.concatenate([first, prev.astype(first.dtype)], axis=1)
        return seq + self.codebook_pos[...].astype(seq.dtype)[None]

    def __call__(self, hidden: jax.Array, codes: jax.Array) -> jax.Array:
        """教師強制：`hidden [B, N, d]`、`codes [B, N, Q]` → logits `[B, N, Q, codebook_size]`。"""
        b, n, d = hidden.shape
        q = self.cfg.num_codebooks
        x = self._inputs(hidden.reshape(b * n, d), codes.reshape(b * n, q))
        out, _ = self.depth.forward_embeds(x)
        return self.depth.logits(out).reshape(b, n, q, -1)

    def generate(self, hidden: jax.Array, temperature: float = 0.0, rng: Any = None) -> jax.Array:
        """逐碼本產生：`hidden [M, d]` → `codes [M, Q]`（溫度 0 為貪婪）。"""
        m = hidden.shape[0]
        q = self.cfg.num_codebooks
        codes = jnp.zeros((m, q), jnp.int32)
        for k in range(q):
            x = self._inputs(hidden, codes)
            out, _ = self.depth.forward_embeds(x[:, : k + 1])
            logits = self.depth.logits(out[:, k])
            if temperature > 0:
                rng, sub = jax.random.split(rng)
                nxt = jax.random.categorical(sub, logits / temperature, axis=-1)
            else:
                nxt = jnp.argmax(logits, axis=-1)
            codes = codes.at[:, k].set(nxt.astype(jnp.int32))
        return codes
