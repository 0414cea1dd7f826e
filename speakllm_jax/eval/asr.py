"""以語音大模型做 ASR：`[<|task_asr|>, <|audio_start|>] + 音訊 + [<|audio_end|>]` 之後貪婪解碼文字。"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef", "max_new"))
def _decode(
    graphdef: Any,
    state: Any,
    features: jax.Array,
    prefix: jax.Array,
    suffix: jax.Array,
    max_new: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    audio, _ = model.encode_audio(features, None)
    b = audio.shape[0]
    pre = model.llm.embed(jnp.broadcast_to(prefix, (b, prefix.shape[0])))
    suf = model.llm.embed(jnp.broadcast_to(suffix, (b, suffix.shape[0])))
    embeds = jnp.concatenate([pre, audio.astype(pre.dtype), suf], axis=1)
    cache = model.llm.init_cache(b, embeds.shape[1] + max_new)
    hidden, cache = model.llm.forward_embeds(embeds, cache=cache)
    tok = jnp.argmax(model.llm.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)

    def step(i: jax.Array, carry: tuple) -> tuple:
        params, cache, tok, out = carry
        m = nnx.merge(graphdef, params)
        h, cache = m.llm.forward_embeds(m.llm.embed(tok[:, None]), cache=cache)
        nxt = jnp.argmax(m.llm.logits(h[:, -1]), axis=-1).astype(jnp.int32)
        return params, cache, nxt, out.at[:, i].set(nxt)

    _, _, _, out = jax.lax.fori_loop(1, max_new, step, (state, cache, tok, out))
    return out


def transcribe(
    model: Any, tokenizer: Any, features: np.ndarray, max_new_tokens: int = 48
) -> list[str]:
    """`features [B, n_mels, F]`（F 為 4 的倍數）→ 每筆的轉寫文字（在 eos 處截斷）。"""
    prefix = jnp.asarray(
        [tokenizer.special_id("<|task_asr|>"), tokenizer.special_id("<|audio_start|>")], jnp.int32
    )
    suffix = jnp.asarray([tokenizer.special_id("<|audio_end|>")], jnp.int32)
    graphdef, state = nnx.split(model)
    ids = np.asarray(
        _decode(graphdef, state, jnp.asarray(features), prefix, suffix, max_new_tokens)
    )
    out = []
    for row in ids:
        row = list(row)
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
