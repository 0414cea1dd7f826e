"""所有模型共用的注意力核心：GQA 多頭注意力、遮罩、RoPE 與唯一的 KV 快取型別。

Qwen2（思考者、深度 Transformer、CosyVoice2 talker 的主幹）與 Whisper 編碼器／解碼器都用
本模組的 `Attention`；各模型只決定投影名稱（例如 `o_proj` 或 `out_proj`）與偏置，參數路徑因此
和各自的 HF 檢查點一致。

慣例：
- 遮罩一律是布林值（True 為可看），形狀可廣播到 `[batch, q_len, k_len]`；被遮掉的分數設為
  `NEG_INF`。分數與 softmax 以 fp32 計算，再轉回計算精度乘上 v。
- 位置：RoPE（`rope=(cos, sin)`，HF 的 rotate_half 慣例）或由呼叫端加在輸入上的絕對位置
  （Whisper；此時 `rope=None`）。
- `KVCache` 是純函數式 pytree：`k`、`v` 各層堆疊於第 0 軸；線性快取由 `index` 起依序寫入，
  環狀快取（`ring=True`）保留最前面 `sinks` 個槽，其餘槽循環覆寫（長對話的注意力槽加滑動視窗，
  以及 Whisper 串流編碼器有界的左方脈絡）。
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.layers import dense

NEG_INF = -1e30

# 一組 `(k, v)`：單層的快取 `[batch, slots, kv_heads, head_dim]`。
LayerKV = tuple[jax.Array, jax.Array]


# ---------------------------------------------------------------- 位置


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


# ---------------------------------------------------------------- 快取


@flax.struct.dataclass
class KVCache:
    """逐步解碼與串流編碼共用的 KV 快取（pytree，可放進 jit 與 lax 迴圈）。

    `k`、`v`：`[layers, batch, slots, kv_heads, head_dim]`；`valid`：`[batch, slots]`
    標記哪些槽位是真實（非填充）的詞；`next_pos`：`[batch]` 每列下一個詞的位置；
    `index`：純量，已寫入的詞數（整批共用；線性快取即下一次寫入的槽位）。
    `cross_k`、`cross_v`：編碼器–解碼器模型預先算好的交叉注意力 KV（沒有時為 None）。

    `sinks`、`ring`（靜態）：`ring=True` 時前 `sinks` 個槽固定放最前面的詞（注意力槽），
    其餘槽是環狀視窗，新的一段覆寫視窗中最舊的槽；一段必須整段落在視窗內不繞回
    （LLM 一次一個詞；串流編碼器一次一個區塊，視窗為區塊的整數倍）。環狀快取的新詞看得見
    所有有效槽（含同一段的其他詞）。RoPE 位置不重設，照 `next_pos` 一直增長。
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_pos: jax.Array
    index: jax.Array
    cross_k: jax.Array | None = None
    cross_v: jax.Array | None = None
    sinks: int = flax.struct.field(pytree_node=False, default=0)
    ring: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        layers: int,
        batch: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any,
        *,
        ring: bool = False,
        sinks: int = 0,
        cross: LayerKV | None = None,
    ) -> KVCache:
        """全零的快取；`cross` 為各層堆疊的交叉注意力 `(k, v)`。"""
        shape = (layers, batch, slots, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, slots), jnp.bool_),
            next_pos=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            cross_k=None if cross is None else cross[0],
            cross_v=None if cross is None else cross[1],
            sinks=int(sinks),
            ring=bool(ring),
        )

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    def write_slot(self) -> jax.Array:
        """下一段寫入的第一個槽位。"""
        if not self.ring:
            return self.index
        s, w = self.sinks, self.max_len - self.sinks
        return jnp.where(self.index < s, self.index, s + (self.index - s) % w)

    def advanced(self, k: jax.Array, v: jax.Array, valid: jax.Array, new: jax.Array) -> KVCache:
        """寫入一段之後的快取：`new [batch, t]` 為這一段的有效遮罩。"""
        return self.replace(
            k=k,
            v=v,
            valid=valid,
            next_pos=self.next_pos + jnp.sum(new, axis=-1, dtype=jnp.int32),
            index=self.index + new.shape[1],
        )


def write_kv(kv: LayerKV, k: jax.Array, v: jax.Array, slot: jax.Array) -> LayerKV:
    """把一段 `k`、`v` `[batch, t, kv_heads, head_dim]` 寫入單層快取 `slot` 起的槽位。"""
    ck, cv = kv
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, slot, zero, zero))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, slot, zero, zero))
    return ck, cv


# ---------------------------------------------------------------- 遮罩


def self_attention_mask(
    valid: jax.Array,
    cache: KVCache | None = None,
    window: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """自注意力的遮罩 `[batch, t, k_len]` 與（寫入後的）鍵有效遮罩 `[batch, k_len]`。

    `valid [batch, t]`：這一段的有效（非填充）詞。無快取時為因果加填充遮罩；線性快取時這一段
    寫在 `cache.index` 起的槽位，看得見之前所有有效的槽（因果）；環狀快取時看得見所有有效槽。
    `window=(sinks, w)`（僅無快取時）：第 i 個詞只看 `j < sinks` 或 `i - j < w` 的詞。
    """
    t = valid.shape[1]
    if cache is None:
        key_valid = valid
        q_slot = jnp.arange(t)
        k_slot = jnp.arange(t)
    else:
        key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.write_slot()))
        k_slot = jnp.arange(cache.max_len)
        q_slot = jnp.full((t,), cache.max_len) if cache.ring else cache.index + jnp.arange(t)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]
    if window is not None:
        if cache is not None:
            raise ValueError("window 遮罩只用於無快取的整段前向；有快取時請用環狀快取")
        near = (k_slot[None, :] < window[0]) | (q_slot[:, None] - k_slot[None, :] < window[1])
        allowed = allowed & near[None]
    return allowed, key_valid


def block_causal_mask(num_frames: int, chunk_frames: int, left_chunks: int = 0) -> jax.Array:
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


# ---------------------------------------------------------------- 注意力


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float = 1.0
) -> jax.Array:
    """GQA 點積注意力：`q [B,T,H,D]`、`k, v [B,S,K,D]`（H 為 K 的整數倍）→ `[B,T,H,D]`。

    `mask` 為布林值，可廣播到 `[B, T, S]`；`scale` 乘在分數上（查詢已預先縮放時為 1）。
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if mask is not None:
        scores = jnp.where(jnp.asarray(mask)[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


# 建立投影層的函式：`(名稱, 輸入寬, 輸出寬, 邏輯軸, use_bias) -> nnx.Linear`。
ProjFactory = Callable[[str, int, int, tuple[str, str], bool], nnx.Module]


class Attention(nnx.Module):
    """多頭（GQA）注意力：`q_proj`、`k_proj`、`v_proj` 與名為 `out_name` 的輸出投影。

    `bias=(q, k, v, out)` 為各投影是否帶偏置。`scale_query=True` 時先把 `q_proj` 的輸出乘上
    `head_dim ** -0.5` 再做點積（Whisper 的計算順序），否則縮放分數（Qwen2）。`proj` 可換成
    建立 LoRA 投影的函式；未給時為一般的 `dense`。
    """

    def __init__(
        self,
        embed: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: tuple[bool, bool, bool, bool],
        out_name: str = "o_proj",
        scale_query: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        proj: ProjFactory | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} 不是 num_kv_heads {num_kv_heads} 的整數倍")
        if proj is None:

            def proj(name: str, i: int, o: int, axes: tuple[str, str], use_bias: bool) -> Any:
                return dense(
                    i, o, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.scale_query = scale_query
        self.out_name = out_name
        h, kv = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = proj("q_proj", embed, h, ("embed", "heads"), bias[0])
        self.k_proj = proj("k_proj", embed, kv, ("embed", "kv_heads"), bias[1])
        self.v_proj = proj("v_proj", embed, kv, ("embed", "kv_heads"), bias[2])
        setattr(self, out_name, proj(out_name, h, embed, ("heads", "embed"), bias[3]))

    def _split(self, x: jax.Array, heads: int) -> jax.Array:
        return x.reshape(*x.shape[:-1], heads, self.head_dim)

    def query(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """`x [B,T,E]` → `[B,T,H,D]`（依設定預先縮放、套上 RoPE）。"""
        q = self.q_proj(x)
        if self.scale_query:
            q = q * (self.head_dim**-0.5)
        q = self._split(q, self.num_heads)
        return q if rope is None else apply_rope(q, *rope)

    def key_value(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`x [B,S,E]` → `k, v [B,S,K,D]`（k 套上 RoPE）。"""
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        return (k if rope is None else apply_rope(k, *rope)), v

    def output(self, o: jax.Array) -> jax.Array:
        """`[B,T,H,D]` → 輸出投影 `[B,T,E]`。"""
        return getattr(self, self.out_name)(o.reshape(*o.shape[:-2], -1))

    def attend_to(
        self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """查詢 `x` 對已算好的 `k`、`v`（例如交叉注意力的編碼器 KV）做注意力並輸出投影。"""
        scale = 1.0 if self.scale_query else self.head_dim**-0.5
        return self.output(attend(self.query(x), k, v, mask, scale))

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        rope: tuple[jax.Array, jax.Array] | None = None,
        kv: LayerKV | None = None,
        slot: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """自注意力。給了單層快取 `kv` 時，新的 k/v 寫入 `slot` 起的槽位，注意力看整段快取，
        並回傳更新後的 `kv`；`mask` 的鍵軸對應快取的槽位。"""
        k, v = self.key_value(x, rope)
        if kv is not None:
            kv = write_kv(kv, k, v, slot)
            k, v = kv[0].astype(self.dtype), kv[1].astype(self.dtype)
        scale = 1.0 if self.scale_query else self.head_dim**-0.5
        return self.output(attend(self.query(x, rope), k, v, mask, scale)), kv
