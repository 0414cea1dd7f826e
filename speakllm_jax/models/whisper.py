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

各層參數以 `nnx.vmap` 堆疊（前綴軸 `"layers"`），前向以 `nnx.scan` 執行（`scan_layers=False`
時以 Python 迴圈逐層展開，參數佈局不變），並可依 `remat` 設定重算。
編碼器的位置表是不訓練的緩衝區（`Buffer`，不是 `nnx.Param`），和 transformers 中
`requires_grad=False` 的 `embed_positions` 相同；從檢查點載入。
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.models.layers import LayerNorm, constrain, dense, maybe_remat, partitioned

LAYER_NORM_EPS = 1e-5
_NEG_INF = -1e30

# transformers `WhisperConfig` 的預設值；config.json 缺少某欄時以此補上。
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "encoder_ffn_dim": 1536,
    "d_model": 384,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# 由本設定類別產生的 HF 欄位；其他欄位原樣保存在 `hf_extra`。
_OWNED_HF_KEYS = set(_HF_DEFAULTS) | {
    "model_type",
    "architectures",
    "activation_function",
    "scale_embedding",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "dtype",
    "torch_dtype",
    "transformers_version",
}


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

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
        """由 transformers 的 config.json 內容建立；`overrides` 可覆寫 dtype、remat 等欄位。"""
        if d.get("model_type", "whisper") != "whisper":
            raise ValueError(
                f"config.json 的 model_type 為 {d.get('model_type')!r}，不是 'whisper'"
            )
        act = d.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json 的 activation_function={act!r}；只支援 'gelu'")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError(
                "config.json 的 tie_word_embeddings=false；只支援與詞嵌入綁定的輸出投影"
            )
        kwargs: dict[str, Any] = {}
        for key, default in _HF_DEFAULTS.items():
            value = d.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"config.json 的欄位 {key} 必須是整數，收到 {value!r}")
            kwargs[key] = value
        dt = d.get("dtype") or d.get("torch_dtype")
        if isinstance(dt, str) and dt in _DTYPE_NAMES:
            kwargs["param_dtype"] = _DTYPE_NAMES[dt]
        extra = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in _OWNED_HF_KEYS))
        kwargs["hf_extra"] = extra
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self, architecture: str = "WhisperForConditionalGeneration") -> dict[str, Any]:
        """transformers `WhisperConfig` 能讀的 config.json 內容。"""
        out: dict[str, Any] = {k: json.loads(v) for k, v in self.hf_extra}
        # 詞表小到放不下官方特殊符號 id 的設定（隨機的小模型）若沒給 id，明寫詞表最後一個 id：
        # 否則 transformers 套用預設 id（50256、50257），載入時每個 id 各警告一次
        # （decoder_start_token_id 必須是整數，不能寫 null）。
        if self.vocab_size <= max(_MEDIUM_TOKENS.values()):
            for key in _MEDIUM_TOKENS:
                out.setdefault(key, self.vocab_size - 1)
        out.update({k: getattr(self, k) for k in _HF_DEFAULTS})
        dtype_name = jnp.dtype(self.param_dtype).name
        if dtype_name not in _DTYPE_NAMES:
            raise ValueError(f"param_dtype={dtype_name} 無法寫成 config.json 的 dtype")
        out.update(
            {
                "model_type": "whisper",
                "architectures": [architecture],
                "activation_function": "gelu",
                "scale_embedding": False,
                "tie_word_embeddings": True,
                "is_encoder_decoder": True,
                "dtype": dtype_name,
            }
        )
        return out

    def replace(self, **kw: Any) -> WhisperConfig:
        return replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# 官方 token 編號（medium 與 large-v3 的 config.json）。
_MEDIUM_TOKENS = {
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
    """openai/whisper-medium：80 梅爾、d 1024、24+24 層、16 頭、FFN 4096、詞表 51865。"""
    base = WhisperConfig(
        num_mel_bins=80,
        d_model=1024,
        encoder_layers=24,
        encoder_attention_heads=16,
        encoder_ffn_dim=4096,
        decoder_layers=24,
        decoder_attention_heads=16,
        decoder_ffn_dim=4096,
        vocab_size=51865,
        hf_extra=_extra(_MEDIUM_TOKENS),
    )
    return base.replace(**overrides)


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


# ---------------------------------------------------------------- 基本運算


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`q [B,T,H,D]`（已縮放）、`k, v [B,S,H,D]`、布林遮罩可廣播到 `[B,H,T,S]`。"""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


class WhisperAttention(nnx.Module):
    """多頭注意力（自注意力或交叉注意力）；`k_proj` 無偏置。"""

    def __init__(self, cfg: WhisperConfig, num_heads: int, *, rngs: nnx.Rngs) -> None:
        d = cfg.d_model
        self.num_heads = num_heads
        self.head_dim = d // num_heads
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.q_proj = dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = dense(d, d, ("embed", "heads"), use_bias=False, **kw)
        self.v_proj = dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = dense(d, d, ("heads", "embed"), **kw)

    def _split(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def query(self, x: jax.Array) -> jax.Array:
        return self._split(self.q_proj(x) * (self.head_dim**-0.5))

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def output(self, o: jax.Array) -> jax.Array:
        return self.out_proj(o.reshape(*o.shape[:-2], -1))

    def __call__(self, x: jax.Array, kv_input: jax.Array, mask: jax.Array | None) -> jax.Array:
        k, v = self.key_value(kv_input)
        return self.output(_attend(self.query(x), k, v, mask))


def _ln(cfg: WhisperConfig) -> LayerNorm:
    return LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class WhisperEncoderLayer(nnx.Module):
    """前置 LayerNorm 的編碼器層。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.self_attn = WhisperAttention(cfg, cfg.encoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = _ln(cfg)
        self.fc1 = dense(cfg.d_model, cfg.encoder_ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.encoder_ffn_dim, cfg.d_model, ("mlp", "embed"), **kw)
        self.final_layer_norm = _ln(cfg)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h, mask)
        h = self.final_layer_norm(x)
        return x + self.fc2(_gelu(self.fc1(h)))


class WhisperDecoderLayer(nnx.Module):
    """前置 LayerNorm 的解碼器層：因果自注意力、交叉注意力、MLP。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        kw = {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rngs": rngs}
        self.self_attn = WhisperAttention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = _ln(cfg)
        self.encoder_attn = WhisperAttention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.encoder_attn_layer_norm = _ln(cfg)
        self.fc1 = dense(cfg.d_model, cfg.decoder_ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.decoder_ffn_dim, cfg.d_model, ("mlp", "embed"), **kw)
        self.final_layer_norm = _ln(cfg)

    def _tail(self, x: jax.Array, cross_k: jax.Array, cross_v: jax.Array) -> jax.Array:
        h = self.encoder_attn_layer_norm(x)
        x = x + self.encoder_attn.output(
            _attend(self.encoder_attn.query(h), cross_k, cross_v, None)
        )
        h = self.final_layer_norm(x)
        return x + self.fc2(_gelu(self.fc1(h)))

    def __call__(self, x: jax.Array, encoder_hidden: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h, mask)
        ck, cv = self.encoder_attn.key_value(encoder_hidden)
        return self._tail(x, ck, cv)

    def step(
        self,
        x: jax.Array,
        index: jax.Array,
        cache: dict[str, jax.Array],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """以 KV 快取前進：`x [B,T,D]` 為位置 `index..index+T-1` 的輸入。"""
        h = self.self_attn_layer_norm(x)
        q = self.self_attn.query(h)
        k, v = self.self_attn.key_value(h)
        zero = jnp.zeros((), jnp.int32)
        keys = jax.lax.dynamic_update_slice(
            cache["k"], k.astype(cache["k"].dtype), (zero, index, zero, zero)
        )
        values = jax.lax.dynamic_update_slice(
            cache["v"], v.astype(cache["v"].dtype), (zero, index, zero, zero)
        )
        t = x.shape[1]
        q_pos = index + jnp.arange(t)
        k_pos = jnp.arange(keys.shape[1])
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        x = x + self.self_attn.output(_attend(q, keys, values, mask))
        x = self._tail(x, cache["cross_k"], cache["cross_v"])
        return x, {**cache, "k": keys, "v": values}


# ---------------------------------------------------------------- 堆疊與掃描


def _stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


def _run_layers(
    layers: nnx.Module,
    body: Callable[..., tuple[Any, Any]],
    carry: Any,
    xs: Any,
    num_layers: int,
    cfg: WhisperConfig,
) -> tuple[Any, Any]:
    """依序對每層執行 `body(layer, carry, x_i) -> (carry, y_i)`；`xs` 與輸出以第 0 軸堆疊。"""
    fn = maybe_remat(body, cfg.remat)
    if cfg.scan_layers:

        @nnx.scan(
            in_axes=(0, nnx.Carry, 0),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def scan_fn(layer: nnx.Module, c: Any, x: Any) -> tuple[Any, Any]:
            return fn(layer, c, x)

        return scan_fn(layers, carry, xs)
    graphdef, state = nnx.split(layers)
    ys = []
    for i in range(num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        carry, y = fn(layer, carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


# ---------------------------------------------------------------- 編碼器


def chunk_causal_mask(num_frames: int, chunk_frames: int, left_chunks: int = 0) -> jax.Array:
    """區塊因果遮罩 `[T, T]`：框 i 可看框 j 若且唯若 `j // c <= i // c`；`left_chunks = L > 0` 時
    另限 `j // c >= i // c - L`（只看自己的區塊與左邊 L 個區塊），`0` 為不限。"""
    if chunk_frames <= 0:
        raise ValueError(f"chunk_frames 必須為正整數，收到 {chunk_frames}")
    if left_chunks < 0:
        raise ValueError(f"left_chunks 不可為負：{left_chunks}")
    block = jnp.arange(num_frames) // chunk_frames
    allowed = block[None, :] <= block[:, None]
    if left_chunks:
        allowed = allowed & (block[None, :] >= block[:, None] - left_chunks)
    return allowed


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
        self.layers = _stacked(lambda r: WhisperEncoderLayer(cfg, rngs=r), cfg.encoder_layers, rngs)
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
            mask = chunk_causal_mask(n_out, int(chunk_frames), left_chunks)[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (input_features.shape[0], input_features.shape[2]):
                raise ValueError(
                    f"attention_mask 形狀應為 {(input_features.shape[0], input_features.shape[2])}，"
                    f"收到 {attention_mask.shape}"
                )
            keys = attention_mask[:, ::2][:, :n_out].astype(bool)[:, None, None, :]
            mask = keys if mask is None else jnp.logical_and(mask, keys)

        def body(layer: WhisperEncoderLayer, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
            h = constrain(h, ("batch", "length", None))
            return constrain(layer(h, mask), ("batch", "length", None)), None

        x, _ = _run_layers(self.layers, body, x, None, cfg.encoder_layers, cfg)
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

    def init_stream(self, batch: int, chunk_frames: int, left_chunks: int) -> dict[str, jax.Array]:
        """串流狀態：前一區塊最後兩個梅爾框、每層左方 `left_chunks * chunk_frames` 框的 KV、
        已編碼的輸出框數 `index`。大小固定，與串流長度無關。"""
        self.check_window(chunk_frames, left_chunks)
        cfg = self.config
        w = left_chunks * chunk_frames
        h = cfg.encoder_attention_heads
        shape = (cfg.encoder_layers, batch, w, h, cfg.encoder_head_dim)
        return {
            "mel": jnp.zeros((batch, cfg.num_mel_bins, 2), cfg.dtype),
            "k": jnp.zeros(shape, cfg.dtype),
            "v": jnp.zeros(shape, cfg.dtype),
            "index": jnp.zeros((), jnp.int32),
        }

    def stream_chunk(
        self, state: dict[str, jax.Array], mel: jax.Array, valid: Any = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """編碼下一個區塊（`c` 個輸出框）→ (`[B, c, d_model]`, 新狀態)。

        `mel [B, n_mels, 2c + 1]` 為這一區塊的 `2c` 個梅爾框加一框前瞻（卷積的 10 ms 前瞻）；
        串流結束時超出音訊的部分補零，`valid` 為其中真實的框數（預設全部）。結果與整段
        `__call__(..., chunk_frames=c, left_chunks=L)` 的對應區塊相同：卷積的左邊界取自狀態中
        的兩個梅爾框，注意力看快取中左方 `L` 個區塊與這一區塊。
        """
        cfg = self.config
        b, _, m = mel.shape
        c = (m - 1) // 2
        w = state["k"].shape[2]
        if m != 2 * c + 1 or c <= 0 or w % c:
            raise ValueError(f"mel 應有 2c+1 框且 c 整除快取長度 {w}，收到 {m} 框")
        valid = m if valid is None else valid
        index = state["index"]
        full = jnp.concatenate([state["mel"], mel.astype(cfg.dtype)], axis=2)
        x = jnp.transpose(full, (0, 2, 1))
        x = _gelu(_conv_valid(self.conv1, x, 1))  # 全域卷積框 2·index−1 … 2·index+2c−1
        local = jnp.arange(2 * c + 1)
        keep = ((local > 0) | (index > 0)) & (local <= valid)
        x = jnp.where(keep[None, :, None], x, 0.0).astype(x.dtype)
        x = _gelu(_conv_valid(self.conv2, x, 2))
        table = self.embed_positions[...]
        x = x + table[encoder_positions(index, c, cfg.max_source_positions)].astype(x.dtype)[None]
        slot = index - w + jnp.arange(w + c)
        mask = (slot >= 0)[None, None, None, :]

        def body(
            layer: WhisperEncoderLayer, h: jax.Array, kv: tuple[jax.Array, jax.Array]
        ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            a = layer.self_attn
            n = layer.self_attn_layer_norm(h)
            k, v = a.key_value(n)
            keys = jnp.concatenate([kv[0], k.astype(kv[0].dtype)], axis=1)
            values = jnp.concatenate([kv[1], v.astype(kv[1].dtype)], axis=1)
            h = h + a.output(_attend(a.query(n), keys, values, mask))
            n = layer.final_layer_norm(h)
            h = h + layer.fc2(_gelu(layer.fc1(n)))
            return h, (keys[:, c:], values[:, c:])

        x, (k, v) = _run_layers(
            self.layers, body, x, (state["k"], state["v"]), cfg.encoder_layers, cfg
        )
        new = {"mel": full[:, :, -3:-1], "k": k, "v": v, "index": index + c}
        return self.layer_norm(x), new

    @staticmethod
    def output_mask(attention_mask: jax.Array) -> jax.Array:
        """梅爾框遮罩 `[B, frames]` → 編碼器輸出框遮罩 `[B, ceil(frames / 2)]`。"""
        return attention_mask[:, ::2].astype(bool)


# ---------------------------------------------------------------- 解碼器


class WhisperDecoder(nnx.Module):
    """Whisper 解碼器；輸出投影與 `embed_tokens` 綁定。"""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.embed_positions = nnx.Param(
            nnx.initializers.normal(0.02)(
                rngs.params(), (cfg.max_target_positions, cfg.d_model), cfg.param_dtype
            ),
            out_sharding=(None, "embed"),
        )
        self.layers = _stacked(lambda r: WhisperDecoderLayer(cfg, rngs=r), cfg.decoder_layers, rngs)
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
        t = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        enc = encoder_hidden.astype(cfg.dtype)

        def body(layer: WhisperDecoderLayer, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
            return layer(h, enc, mask), None

        x, _ = _run_layers(self.layers, body, x, None, cfg.decoder_layers, cfg)
        return self.logits(self.layer_norm(x))

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(hidden).astype(jnp.float32)

    def init_cache(
        self, encoder_hidden: jax.Array, max_length: int | None = None
    ) -> dict[str, jax.Array]:
        """建立解碼快取：自注意力 KV（全零）與預先算好的交叉注意力 KV，各層堆疊於第 0 軸。"""
        cfg = self.config
        max_length = int(max_length or cfg.max_target_positions)
        if max_length > cfg.max_target_positions:
            raise ValueError(
                f"快取長度 {max_length} 超過 max_target_positions={cfg.max_target_positions}"
            )
        b = encoder_hidden.shape[0]
        enc = encoder_hidden.astype(cfg.dtype)

        def body(layer: WhisperDecoderLayer, c: None, _: Any) -> tuple[None, Any]:
            return c, layer.encoder_attn.key_value(enc)

        _, (ck, cv) = _run_layers(self.layers, body, None, None, cfg.decoder_layers, cfg)
        shape = (
            cfg.decoder_layers,
            b,
            max_length,
            cfg.decoder_attention_heads,
            cfg.decoder_head_dim,
        )
        return {
            "k": jnp.zeros(shape, cfg.dtype),
            "v": jnp.zeros(shape, cfg.dtype),
            "cross_k": ck,
            "cross_v": cv,
            "index": jnp.zeros((), jnp.int32),
        }

    def step(
        self, input_ids: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """以快取解碼 `input_ids [B, T]`（接在快取已有的位置之後）→ `(logits, 新快取)`。"""
        cfg = self.config
        self._check_ids(input_ids)
        index = cache["index"]
        x = self._embed(input_ids, index)
        per_layer = {k: cache[k] for k in ("k", "v", "cross_k", "cross_v")}

        def body(
            layer: WhisperDecoderLayer, h: jax.Array, c: dict[str, jax.Array]
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
            h, c = layer.step(h, index, c)
            return h, {"k": c["k"], "v": c["v"]}

        x, new = _run_layers(self.layers, body, x, per_layer, cfg.decoder_layers, cfg)
        new_cache = {**cache, **new, "index": index + input_ids.shape[1]}
        return self.logits(self.layer_norm(x)), new_cache


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

    def init_cache(
        self, encoder_hidden: jax.Array, max_length: int | None = None
    ) -> dict[str, jax.Array]:
        return self.decoder.init_cache(encoder_hidden, max_length)

    def decode_step(
        self, decoder_input_ids: jax.Array, cache: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """KV 快取解碼一步（或一段提示），回傳 `(logits, 新快取)`。"""
        return self.decoder.step(decoder_input_ids, cache)

    def __call__(
        self,
        input_features: jax.Array,
        decoder_input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        return self.decode(decoder_input_ids, self.encode(input_features, attention_mask))


def count_params(model: nnx.Module) -> int:
    """模型中所有變數（含位置表緩衝區）的元素總數；可用於 `nnx.eval_shape` 的抽象模型。"""
    return int(sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model))))
