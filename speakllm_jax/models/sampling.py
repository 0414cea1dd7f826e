"""自回歸取樣：以 KV 快取預填提示，再在 `lax.fori_loop` 中逐詞解碼（整段 jit）。

`generate` 適用任何提供 `embed`、`logits`、`init_cache`、`forward_embeds` 的因果語言模型
（`Qwen2ForCausalLM`）；`speakllm_jax.models.qwen2.generate` 是同一個函式。
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
    model: nnx.Module,
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
