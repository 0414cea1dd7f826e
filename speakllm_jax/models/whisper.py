"""Whisper（編碼器與解碼器），以 Flax NNX 撰寫，數值與 `transformers` 的 Whisper 一致。

結構（與 `transformers.models.whisper.modeling_whisper` 相同）：

- 編碼器：`conv1`（核 3、補 1）→ 精確 GELU → `conv2`（核 3、步長 2、補 1）→ 精確 GELU，
  加上正弦位置表 `embed_positions`，接前置 LayerNorm 的 Transformer 層（`k_proj` 無偏置），
  最後 `layer_norm`。
- 解碼器：詞嵌入加上可學習位置嵌入，每層為因果自注意力、交叉注意力與 MLP（皆為前置
  LayerNorm），最後 `layer_norm`；輸出投影與 `embed_tokens` 綁定。
- 注意力先把 `q_proj` 的輸出乘上 `head_dim ** -0.5`，再做點積（與 transformers 的計算順序相同）。

與 transformers 的差異：

- transformers 的編碼器強制輸入恰好 `2 * max_source_positions`（3000）個梅爾框；
  本實作允許較短的輸入（位置表取前段），供串流與短句訓練使用。框數為奇數時輸出
  `ceil(frames / 2)` 框。
- `encode(..., chunk_frames=c)` 以區塊因果遮罩執行：輸出框 i 只看得到所在區塊及之前的
  區塊（`j // c <= i // c`），讓串流時前面區塊的輸出不受後面音訊影響。注意卷積本身有
  一個梅爾框（10 毫秒）的前瞻：第 k 塊的輸出依賴梅爾框 `0..2c(k+1)`，串流時要多等這一框。
- `encode(..., attention_mask=...)` 可遮掉補齊的框（transformers 忽略此參數）；未給時與
  transformers 完全相同。

注意力、遮罩與 `KVCache`（解碼快取與串流編碼器的環狀快取）來自 `speakllm_jax.models.attention`，
層堆疊（`scan_layers`、`remat`）來自 `speakllm_jax.models.stack`，與 Qwen2 相同；HF `config.json`
的轉換在 `speakllm_jax.checkpoints.whisper_hf`。
編碼器的位置表是不訓練的緩衝區（`Buffer`，不是 `nnx.Param`），和 transformers 中
`requires_grad=False` 的 `embed_positions` 相同；從檢查點載入。
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.models.attention import (
    Attention,
    KVCache,
    LayerKV,
    block_causal_mask,
    self_attention_mask,
)
from speakllm_jax.models.layers import LayerNorm, count_params, dense, embedding, partitioned
from speakllm_jax.models.stack import run_layers, stack_layers

__all__ = [
    "Whisper",
    "WhisperConfig",
    "WhisperDecoder",
    "WhisperEncoder",
    "chunk_causal_mask",
    "count_params",
    "encoder_output_frames",
    "sinusoids",
    "whisper_large_v3",
    "whisper_medium",
]

LAYER_NORM_EPS = 1e-5


class Buffer(nnx.Variable):
    """不參與訓練的固定張量（例如編碼器的正弦位置表）。"""


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper 的正弦位置表 `[length, channels]`（前半 sin、後半 cos）。

    與 transformers 的 `sinusoids`（torch float32）同樣以 float32 逐步計算；指數以 float64 計算後
    捨入，和 torch 的 float32 `exp` 偶有一個 ulp 的差異，乘上位置後最大約 2e-4。
    載入檢查點時一律使用檔案中的表，所以這只影響隨機初始化的模型。
    """
    if channels % 2:
        raise ValueError(f"正弦位置表的通道數必須為偶數，收到 {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    arg = np.float32(-inc) * np.arange(channels // 2, dtype=np.float32)
    inv = np.exp(arg.astype(np.float64)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :].astype(np.float32)
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def encoder_output_frames(mel_frames: int) -> int:
    """`mel_frames` 個梅爾框經兩層卷積（第二層步長 2）後的輸出框數：`ceil(mel_frames / 2)`。"""
    return (int(mel_frames) - 1) // 2 + 1


# ---------------------------------------------------------------- 設定


@dataclass(frozen=True)
class WhisperConfig:
    """Whisper 的維度與執行設定。

    `dtype` 為計算精度、`param_dtype` 為參數精度；`remat` 為 `layers.REMAT_POLICIES` 的名稱；
    `scan_layers=False` 時逐層展開。`hf_extra` 保存 config.json 中本類別不使用的欄位
    （以 JSON 字串存放，讓設定可雜湊），存檔時原樣寫回。
    """

    num_mel_bins: int = 80
    d_model: int = 1024
    encoder_layers: int = 24
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_layers: int = 24
    decoder_attention_heads: int = 16
    decoder_ffn_dim: int = 4096
    max_source_positions: int = 1500
    max_target_positions: int = 448
    vocab_size: int = 51865
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    hf_extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if heads <= 0 or self.d_model % heads:
                raise ValueError(f"WhisperConfig.{name}={heads} 必須整除 d_model={self.d_model}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"WhisperConfig.{f.name} 不可為負：{v}")

    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    def replace(self, **kw: Any) -> WhisperConfig:
        return replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# 官方 token 編號（medium 與 large-v3 的 config.json）。
MEDIUM_TOKENS = {
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "pad_token_id": 50257,
    "decoder_start_token_id": 50258,
}
_LARGE_V3_TOKENS = {
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "pad_token_id": 50256,
    "decoder_start_token_id": 50258,
}


def _extra(d: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, json.dumps(v)) for k, v in d.items()))


def whisper_medium(**overrides: Any) -> WhisperConfig:
    """openai/whisper-medium：80 梅爾、d 1024、24+24 層、16 頭、FFN 4096、詞表 51865
    （即 `WhisperConfig` 的預設值）。"""
    return WhisperConfig(hf_extra=_extra(MEDIUM_TOKENS)).replace(**overrides)


def whisper_large_v3(**overrides: Any) -> WhisperConfig:
    """openai/whisper-large-v3：128 梅爾、d 1280、32+32 層、20 頭、FFN 5120、詞表 51866。"""
    base = WhisperConfig(
        num_mel_bins=128,
        d_model=1280,
        encoder_layers=32,
        encoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_layers=32,
        decoder_attention_heads=20,
        decoder_ffn_dim=5120,
        vocab_size=51866,
        hf_extra=_extra(_LARGE_V3_TOKENS),
    )
    return base.replace(**overrides)


# ---------------------------------------------------------------- 層


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _attention(cfg: WhisperConfig, num_heads: int, rngs: nnx.Rngs) -> Attention:
    """Whisper 的多頭注意力：`k_proj` 無偏置、輸出投影名為 `out_proj`、查詢先縮放。"""
    d = cfg.d_model
    return Attention(
        d,
        num_heads,
        num_heads,
        d // num_heads,
        bias=(True, False, True, True),
        out_name="out_proj",
        scale_query=True,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )


def _ln(cfg: WhisperConfig) -> LayerNorm:
    return LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class _FeedForward(nnx.Module):
    """前置 LayerNorm 的 `fc2(gelu(fc1(x)))` 殘差區塊（參數直接掛在層上：`fc1`、`fc2`）。"""

    def _init_ffn(self, cfg: WhisperConfig, ffn_dim: int, rngs: nnx.Rngs) -> None:
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.fc1 = dense(cfg.d_model, ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = dense(ffn_dim, cfg.d_model, ("mlp", "embed"), **kw)
        self.final_layer_norm = _ln(cfg)

    def _ffn(self, x: jax.Array) -> jax.Array:
        return x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoderLayer(_FeedForward):
    """前置 LayerNorm 的編碼器層。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.self_attn = _attention(cfg, cfg.encoder_attention_heads, rngs)
        self.self_attn_layer_norm = _ln(cfg)
        self._init_ffn(cfg, cfg.encoder_ffn_dim, rngs)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        kv: LayerKV | None = None,
        slot: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        h, kv = self.self_attn(self.self_attn_layer_norm(x), mask, kv=kv, slot=slot)
        return self._ffn(x + h), kv


class WhisperDecoderLayer(_FeedForward):
    """前置 LayerNorm 的解碼器層：因果自注意力、交叉注意力、MLP。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.self_attn = _attention(cfg, cfg.decoder_attention_heads, rngs)
        self.self_attn_layer_norm = _ln(cfg)
        self.encoder_attn = _attention(cfg, cfg.decoder_attention_heads, rngs)
        self.encoder_attn_layer_norm = _ln(cfg)
        self._init_ffn(cfg, cfg.decoder_ffn_dim, rngs)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        cross: LayerKV,
        kv: LayerKV | None = None,
        slot: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """`cross` 為這一層交叉注意力的編碼器 `(k, v)`；給了 `kv` 時自注意力寫入快取。"""
        h, kv = self.self_attn(self.self_attn_layer_norm(x), mask, kv=kv, slot=slot)
        x = x + h
        x = x + self.encoder_attn.attend_to(self.encoder_attn_layer_norm(x), *cross)
        return self._ffn(x), kv


# ---------------------------------------------------------------- 編碼器


# 區塊因果遮罩的舊名稱。
chunk_causal_mask = block_causal_mask


def encoder_positions(start: Any, length: int, period: int) -> jax.Array:
    """框 `start..start+length-1` 的位置表索引：`(start + i) mod period`。

    `period` 為 `max_source_positions`（1500 框 = 30 秒）：30 秒內與 Whisper 的絕對位置相同，
    更長的串流每 30 秒繞回一次。左方脈絡有界時（`left_chunks`），每個框的位置只取決於它自己的
    框號，編碼器 KV 快取中的鍵不必重算。
    """
    return (jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)) % period


def _conv_valid(conv: nnx.Conv, x: jax.Array, stride: int) -> jax.Array:
    """以模組的核與偏置做無補邊（VALID）的一維卷積：`x [B, T, C_in]`。"""
    kernel = conv.kernel[...].astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return y + conv.bias[...].astype(x.dtype)


class WhisperEncoder(nnx.Module):
    """Whisper 編碼器；可單獨使用（語音大模型只用編碼器）。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        d = cfg.d_model
        init = nnx.initializers.normal(0.02)
        conv_kw = {
            "dtype": cfg.dtype,
            "param_dtype": cfg.param_dtype,
            "kernel_init": partitioned(init, ("kernel", "conv_in", "conv_out")),
            "bias_init": partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
            "rngs": rngs,
        }
        self.conv1 = nnx.Conv(cfg.num_mel_bins, d, (3,), padding=((1, 1),), **conv_kw)
        self.conv2 = nnx.Conv(d, d, (3,), strides=(2,), padding=((1, 1),), **conv_kw)
        self.embed_positions = Buffer(
            jnp.asarray(sinusoids(cfg.max_source_positions, d), dtype=cfg.param_dtype),
            out_sharding=(None, "embed"),
        )
        self.layers = stack_layers(
            lambda r: WhisperEncoderLayer(cfg, rngs=r), cfg.encoder_layers, rngs
        )
        self.layer_norm = _ln(cfg)

    def __call__(
        self,
        input_features: jax.Array,
        attention_mask: jax.Array | None = None,
        chunk_frames: int | None = None,
        left_chunks: int = 0,
    ) -> jax.Array:
        """`input_features [B, n_mels, frames]` → `[B, ceil(frames / 2), d_model]`。

        `attention_mask [B, frames]`（梅爾框，1 為有效）會遮掉補齊區域的鍵；
        `chunk_frames`（以輸出框計）啟用區塊因果遮罩，`left_chunks > 0` 再限制左方脈絡
        （見 `chunk_causal_mask`）。位置為 `encoder_positions(0, T, max_source_positions)`；
        只有左方脈絡有界時才允許超過 `max_source_positions` 框（`stream_chunk` 的整段對照）。
        """
        cfg = self.config
        if input_features.ndim != 3 or input_features.shape[1] != cfg.num_mel_bins:
            raise ValueError(
                f"input_features 形狀應為 [B, {cfg.num_mel_bins}, frames]，收到 {input_features.shape}"
            )
        n_out = encoder_output_frames(input_features.shape[2])
        bounded = chunk_frames is not None and left_chunks > 0
        if bounded:
            self.check_window(int(chunk_frames), left_chunks)
        if n_out > cfg.max_source_positions and not bounded:
            raise ValueError(
                f"輸入 {input_features.shape[2]} 個梅爾框得到 {n_out} 個輸出框，超過 "
                f"max_source_positions={cfg.max_source_positions}"
            )
        x = jnp.transpose(input_features, (0, 2, 1)).astype(cfg.dtype)
        x = _gelu(self.conv1(x))
        x = _gelu(self.conv2(x))
        table = self.embed_positions[...]
        pos = table[encoder_positions(0, n_out, cfg.max_source_positions)].astype(x.dtype)
        x = x + pos[None]

        mask = None
        if chunk_frames is not None:
            mask = block_causal_mask(n_out, int(chunk_frames), left_chunks)[None]
        if attention_mask is not None:
            if attention_mask.shape != (input_features.shape[0], input_features.shape[2]):
                raise ValueError(
                    f"attention_mask 形狀應為 {(input_features.shape[0], input_features.shape[2])}，"
                    f"收到 {attention_mask.shape}"
                )
            keys = attention_mask[:, ::2][:, :n_out].astype(bool)[:, None, :]
            mask = keys if mask is None else jnp.logical_and(mask, keys)

        def body(layer: WhisperEncoderLayer, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
            return layer(h, mask)

        x, _ = run_layers(self.layers, body, x, scan=cfg.scan_layers, remat=cfg.remat)
        return self.layer_norm(x)

    def encode(
        self,
        input_features: jax.Array,
        attention_mask: jax.Array | None = None,
        chunk_frames: int | None = None,
        left_chunks: int = 0,
    ) -> jax.Array:
        """與 `__call__` 相同。"""
        return self(input_features, attention_mask, chunk_frames, left_chunks)

    # ---------------------------------------------------------------- 串流

    def check_window(self, chunk_frames: int, left_chunks: int) -> None:
        """串流編碼需要正的區塊大小與左方脈絡。視窗（`(left_chunks + 1) · chunk_frames` 框）
        宜不超過 `max_source_positions`，否則同一視窗內會有位置相同的框（仍是良好定義的，
        訓練、JAX 串流與 PyTorch 相同）。"""
        if chunk_frames <= 0 or left_chunks <= 0:
            raise ValueError(
                f"串流編碼需要 chunk_frames ≥ 1、left_chunks ≥ 1，收到 {chunk_frames}、{left_chunks}"
            )

    def init_stream(self, batch: int, chunk_frames: int, left_chunks: int) -> dict[str, Any]:
        """串流狀態：`mel` 為前一區塊最後兩個梅爾框；`kv` 為各層的環狀 `KVCache`，
        `(left_chunks + 1) * chunk_frames` 個槽（左方 `left_chunks` 個區塊加這一區塊），
        `kv.index` 為已編碼的輸出框數。大小固定，與串流長度無關。"""
        self.check_window(chunk_frames, left_chunks)
        cfg = self.config
        kv = KVCache.create(
            cfg.encoder_layers,
            batch,
            (left_chunks + 1) * chunk_frames,
            cfg.encoder_attention_heads,
            cfg.encoder_head_dim,
            cfg.dtype,
            ring=True,
        )
        return {"mel": jnp.zeros((batch, cfg.num_mel_bins, 2), cfg.dtype), "kv": kv}

    def stream_chunk(
        self, state: dict[str, Any], mel: jax.Array, valid: Any = None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """編碼下一個區塊（`c` 個輸出框）→ (`[B, c, d_model]`, 新狀態)。

        `mel [B, n_mels, 2c + 1]` 為這一區塊的 `2c` 個梅爾框加一框前瞻（卷積的 10 ms 前瞻）；
        串流結束時超出音訊的部分補零，`valid` 為其中真實的框數（預設全部）。結果與整段
        `__call__(..., chunk_frames=c, left_chunks=L)` 的對應區塊相同：卷積的左邊界取自狀態中
        的兩個梅爾框，注意力看環狀快取中左方 `L` 個區塊與這一區塊（區塊寫入的槽位是 `c` 的
        整數倍，所以一個區塊不會繞回）。
        """
        cfg = self.config
        cache: KVCache = state["kv"]
        b, _, m = mel.shape
        c = (m - 1) // 2
        slots = cache.max_len
        if m != 2 * c + 1 or c <= 0 or slots % c or slots // c < 2:
            raise ValueError(f"mel 應有 2c+1 框且 c 整除快取長度 {slots}，收到 {m} 框")
        valid = m if valid is None else valid
        index = cache.index
        full = jnp.concatenate([state["mel"], mel.astype(cfg.dtype)], axis=2)
        x = jnp.transpose(full, (0, 2, 1))
        x = _gelu(_conv_valid(self.conv1, x, 1))  # 全域卷積框 2·index−1 … 2·index+2c−1
        local = jnp.arange(2 * c + 1)
        keep = ((local > 0) | (index > 0)) & (local <= valid)
        x = jnp.where(keep[None, :, None], x, 0.0).astype(x.dtype)
        x = _gelu(_conv_valid(self.conv2, x, 2))
        table = self.embed_positions[...]
        x = x + table[encoder_positions(index, c, cfg.max_source_positions)].astype(x.dtype)[None]
        new = jnp.ones((b, c), jnp.bool_)
        mask, key_valid = self_attention_mask(new, cache)
        slot = cache.write_slot()

        def body(
            layer: WhisperEncoderLayer, h: jax.Array, kv: LayerKV
        ) -> tuple[jax.Array, LayerKV]:
            return layer(h, mask, kv, slot)

        x, (k, v) = run_layers(
            self.layers, body, x, (cache.k, cache.v), scan=cfg.scan_layers, remat=cfg.remat
        )
        state = {"mel": full[:, :, -3:-1], "kv": cache.advanced(k, v, key_valid, new)}
        return self.layer_norm(x), state

    @staticmethod
    def output_mask(attention_mask: jax.Array) -> jax.Array:
        """梅爾框遮罩 `[B, frames]` → 編碼器輸出框遮罩 `[B, ceil(frames / 2)]`。"""
        return attention_mask[:, ::2].astype(bool)


# ---------------------------------------------------------------- 解碼器


class WhisperDecoder(nnx.Module):
    """Whisper 解碼器；輸出投影與 `embed_tokens` 綁定。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.embed_tokens = embedding(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.embed_positions = nnx.Param(
            nnx.initializers.normal(0.02)(
                rngs.params(), (cfg.max_target_positions, cfg.d_model), cfg.param_dtype
            ),
            out_sharding=(None, "embed"),
        )
        self.layers = stack_layers(
            lambda r: WhisperDecoderLayer(cfg, rngs=r), cfg.decoder_layers, rngs
        )
        self.layer_norm = _ln(cfg)

    def _embed(self, input_ids: jax.Array, start: jax.Array | int) -> jax.Array:
        cfg = self.config
        t = input_ids.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(self.embed_positions[...], start, t, axis=0)
        return self.embed_tokens(input_ids).astype(cfg.dtype) + pos[None].astype(cfg.dtype)

    def _check_ids(self, input_ids: jax.Array) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"decoder_input_ids 形狀應為 [B, T]，收到 {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_target_positions:
            raise ValueError(
                f"解碼長度 {input_ids.shape[1]} 超過 max_target_positions="
                f"{self.config.max_target_positions}"
            )

    def __call__(self, input_ids: jax.Array, encoder_hidden: jax.Array) -> jax.Array:
        """`input_ids [B, T]`、`encoder_hidden [B, S, D]` → logits `[B, T, vocab]`（float32）。"""
        cfg = self.config
        self._check_ids(input_ids)
        x = self._embed(input_ids, 0)
        mask, _ = self_attention_mask(jnp.ones(input_ids.shape, jnp.bool_))
        enc = encoder_hidden.astype(cfg.dtype)

        def body(layer: WhisperDecoderLayer, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
            return layer(h, mask, layer.encoder_attn.key_value(enc))[0], None

        x, _ = run_layers(self.layers, body, x, scan=cfg.scan_layers, remat=cfg.remat)
        return self.logits(self.layer_norm(x))

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(hidden).astype(jnp.float32)

    def init_cache(self, encoder_hidden: jax.Array, max_length: int | None = None) -> KVCache:
        """建立解碼快取：自注意力 KV（全零）與預先算好的交叉注意力 KV（`cross_k`、`cross_v`），
        各層堆疊於第 0 軸。"""
        cfg = self.config
        max_length = int(max_length or cfg.max_target_positions)
        if max_length > cfg.max_target_positions:
            raise ValueError(
                f"快取長度 {max_length} 超過 max_target_positions={cfg.max_target_positions}"
            )
        enc = encoder_hidden.astype(cfg.dtype)

        def body(layer: WhisperDecoderLayer, c: None, _: Any) -> tuple[None, LayerKV]:
            return c, layer.encoder_attn.key_value(enc)

        _, cross = run_layers(self.layers, body, None, scan=cfg.scan_layers, remat=cfg.remat)
        return KVCache.create(
            cfg.decoder_layers,
            encoder_hidden.shape[0],
            max_length,
            cfg.decoder_attention_heads,
            cfg.decoder_head_dim,
            cfg.dtype,
            cross=cross,
        )

    def step(self, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """以快取解碼 `input_ids [B, T]`（接在快取已有的位置之後）→ `(logits, 新快取)`。"""
        cfg = self.config
        self._check_ids(input_ids)
        x = self._embed(input_ids, cache.index)
        new = jnp.ones(input_ids.shape, jnp.bool_)
        mask, key_valid = self_attention_mask(new, cache)
        slot = cache.write_slot()

        def body(
            layer: WhisperDecoderLayer, h: jax.Array, c: tuple[LayerKV, LayerKV]
        ) -> tuple[jax.Array, LayerKV]:
            return layer(h, mask, c[1], c[0], slot)

        xs = ((cache.k, cache.v), (cache.cross_k, cache.cross_v))
        x, (k, v) = run_layers(self.layers, body, x, xs, scan=cfg.scan_layers, remat=cfg.remat)
        return self.logits(self.layer_norm(x)), cache.advanced(k, v, key_valid, new)


# ---------------------------------------------------------------- 完整模型


class Whisper(nnx.Module):
    """完整 Whisper（對應 `WhisperForConditionalGeneration`）：`encoder` 與 `decoder`。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.encoder = WhisperEncoder(cfg, rngs=rngs)
        self.decoder = WhisperDecoder(cfg, rngs=rngs)

    def encode(
        self,
        input_features: jax.Array,
        attention_mask: jax.Array | None = None,
        chunk_frames: int | None = None,
    ) -> jax.Array:
        """`[B, n_mels, frames]` → `[B, ceil(frames / 2), d_model]`，見 `WhisperEncoder`。"""
        return self.encoder(input_features, attention_mask, chunk_frames)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array) -> jax.Array:
        """`[B, T]` token 與編碼器輸出 → logits `[B, T, vocab]`。"""
        return self.decoder(decoder_input_ids, encoder_hidden)

    def init_cache(self, encoder_hidden: jax.Array, max_length: int | None = None) -> KVCache:
        return self.decoder.init_cache(encoder_hidden, max_length)

    def decode_step(
        self, decoder_input_ids: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """KV 快取解碼一步（或一段提示），回傳 `(logits, 新快取)`。"""
        return self.decoder.step(decoder_input_ids, cache)

    def __call__(
        self,
        input_features: jax.Array,
        decoder_input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        return self.decode(decoder_input_ids, self.encode(input_features, attention_mask))
