"""CosyVoice2 talker 的雙流（bistream）自迴歸生成：文字一塊一塊進來，語音碼一個一個出去。

與訓練序列（`speakllm_jax.data.interleave.interleave_fixed` 的 bistream）同一個版面：

    [sos] [文字 × n_text] [語音 × n_speech] [文字 × n_text] [語音 × n_speech] … [剩下文字] [task_id] [語音 …]

每塊完整的文字（`text_chunks` 給定時依其大小，例如 Tone-Aware 切塊）餵進去之後生成語音碼，
直到模型輸出 fill（6563）或已生成該塊的 `n_speech` 個碼（此時強制視為 fill，與官方
`inference_bistream` 相同）；fill 不當作輸入。文字用完後餵剩下的文字與 task_id，生成到 eos
（6561）或 `max_speech` 為止。只有一般語音碼（< 6561）會被輸出與回饋；在文字還沒用完時
不會選 eos，在最後一段不會選 fill。

以 KV 快取逐步前向（批次 1）；`temperature=0` 為貪婪，否則依 `rng` 取樣。
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from speakllm_jax.models.cosyvoice2_talker import SOS_INDEX, TASK_INDEX, CosyVoice2Talker


@dataclass
class BistreamOutput:
    """生成結果：`speech` 為語音碼（不含 fill／eos）；`chunk_speech[j]` 為第 j 塊文字之後的碼；
    `forced_fill` 記錄哪些塊是因為滿 `n_speech` 而強制換文字；`stopped` 為 "eos" 或 "max_speech"。"""

    speech: list[int]
    chunk_speech: list[list[int]] = field(default_factory=list)
    forced_fill: list[bool] = field(default_factory=list)
    stopped: str = "eos"


def _chunk_sizes(num_text: int, n_text: int, text_chunks: Sequence[int] | None) -> list[int]:
    """完整文字塊的大小；剩下不足一塊的文字接在 task_id 前面（與 `interleave_fixed` 一致）。"""
    if text_chunks is None:
        return [n_text] * (num_text // n_text)
    sizes = [int(s) for s in text_chunks]
    if any(s <= 0 for s in sizes) or sum(sizes) > num_text:
        raise ValueError(f"text_chunks={sizes} 不合法：每塊須 > 0 且總和 ≤ 文字數 {num_text}")
    return sizes


def generate_bistream(
    talker: CosyVoice2Talker,
    text_ids: Any,
    *,
    n_text: int = 5,
    n_speech: int = 15,
    text_chunks: Sequence[int] | None = None,
    thinker_hidden: Any = None,
    max_speech: int = 500,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
) -> BistreamOutput:
    """由文字符號 `text_ids [T]`（可附每個文字的思考者隱狀態 `[T, D]`）生成 CosyVoice2 語音碼。"""
    text = np.asarray(text_ids, dtype=np.int32).reshape(-1)
    if text.size == 0:
        raise ValueError("text_ids 為空")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 需要 rng")
    hidden = None if thinker_hidden is None else jnp.asarray(thinker_hidden)[None]
    if hidden is not None and hidden.shape[1] != text.size:
        raise ValueError(f"thinker_hidden 有 {hidden.shape[1]} 列，文字有 {text.size} 個")
    cfg = talker.cfg
    sizes = _chunk_sizes(text.size, n_text, text_chunks)
    size_s = cfg.speech_token_size
    eos, fill = cfg.eos_id, cfg.fill_id
    cache = talker.init_cache(1, 2 + text.size + len(sizes) * n_speech + max_speech)

    def feed(x: jax.Array) -> jax.Array:
        nonlocal cache
        h, cache = talker.llm.forward_embeds(x[None], cache=cache)
        return talker.decode(h[:, -1])[0]

    def text_inputs(lo: int, hi: int) -> jax.Array:
        ids = jnp.asarray(text[lo:hi])[None]
        h = None if hidden is None else hidden[:, lo:hi]
        return talker.fuse(h, talker.text_embed(ids))[0]

    def pick(logits: jax.Array, allowed: int) -> int:
        nonlocal rng
        lp = jnp.full_like(logits, -jnp.inf).at[:size_s].set(logits[:size_s])
        lp = lp.at[allowed].set(logits[allowed])
        if temperature <= 0:
            return int(jnp.argmax(lp))
        rng, key = jax.random.split(rng)
        return int(jax.random.categorical(key, lp / temperature))

    out = BistreamOutput(speech=[])
    logits = feed(talker.special_embed(SOS_INDEX)[None])
    pos = 0
    for size in sizes:
        logits = feed(text_inputs(pos, pos + size))
        pos += size
        chunk: list[int] = []
        while True:
            if len(chunk) == n_speech:
                out.forced_fill.append(True)
                break
            tok = pick(logits, fill)
            if tok == fill:
                out.forced_fill.append(False)
                break
            chunk.append(tok)
            out.speech.append(tok)
            if len(out.speech) >= max_speech:
                out.chunk_speech.append(chunk)
                out.stopped = "max_speech"
                return out
            logits = feed(talker.speech_embed(jnp.asarray([tok])))
        out.chunk_speech.append(chunk)
    rest = text_inputs(pos, text.size)
    logits = feed(jnp.concatenate([rest, talker.special_embed(TASK_INDEX)[None]], axis=0))
    chunk = []
    while True:
        tok = pick(logits, eos)
        if tok == eos:
            break
        chunk.append(tok)
        out.speech.append(tok)
        if len(out.speech) >= max_speech:
            out.stopped = "max_speech"
            break
        logits = feed(talker.speech_embed(jnp.asarray([tok])))
    out.chunk_speech.append(chunk)
    return out
