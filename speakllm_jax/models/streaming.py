"""全雙工幀模型的 JAX 串流推論：逐 40 ms 幀前進、LLM 用 KV 快取、Whisper 以區塊編碼。

這是評估與 PyTorch 服務端行為的參考實作。每個區塊（`chunk_frames` 個 LLM 幀）：
使用者聲道的梅爾累積到足夠後，以區塊因果遮罩編碼目前為止的音訊，取出這一區塊的使用者串流
（區塊因果遮罩讓先前區塊的輸出不受後來音訊影響，結果與整段以同一遮罩編碼相同）；
然後逐幀呼叫單一編譯好的 `frame_step`：組輸入 → LLM 一步（KV 快取）→ 各頭。

助理上一幀的輸出可以是模型自己的（自由執行：貪婪選文字與輪替、深度 Transformer 產生語音碼），
也可以由呼叫端給定（教師強制）；教師強制時每幀的 logits 與 `SpeakLLM.duplex_forward`
以同一區塊遮罩做整段前向的結果相同（測試驗證）。

Whisper 梅爾的正規化（整段最大值減 8 的下限）不是因果的：這裡假設呼叫端給的是整段計算好的
梅爾，或以固定下限計算的串流梅爾；伺服器端用後者。
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.labels import SPEAKING_ACTIONS
from speakllm_jax.models.speakllm import SpeakLLM


@dataclass
class StreamOutputs:
    """串流結果（N 幀）。"""

    text_logits: np.ndarray  # [B, N, V]
    turn_logits: np.ndarray  # [B, N, 5]
    code_logits: np.ndarray | None  # [B, N, Q, C]（教師強制時）
    text: np.ndarray  # [B, N] 每幀輸出的文字符號
    turn: np.ndarray  # [B, N] 每幀的輪替動作
    codes: np.ndarray  # [B, N, Q] 每幀的語音碼


def mel_frames_needed(chunk_index: int, chunk_frames: int, total_mel: int) -> int:
    """編碼第 `chunk_index` 個區塊（LLM 幀）所需的梅爾框數：含卷積的 1 框前瞻。"""
    return min(4 * chunk_frames * (chunk_index + 1) + 1, total_mel)


@partial(jax.jit, static_argnames=("graphdef", "mel_len", "chunk_enc"))
def _encode_prefix(
    graphdef: Any, state: Any, mel: jax.Array, mel_len: int, chunk_enc: int
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    feats = mel[:, :, :mel_len]
    user, _ = model.encode_audio(feats, None, chunk_frames=chunk_enc)
    return user


@partial(jax.jit, static_argnames=("graphdef", "teacher", "use_cond"))
def _frame_step(
    graphdef: Any,
    state: Any,
    cache: Any,
    user_t: jax.Array,
    prev: dict[str, jax.Array],
    codes_target: jax.Array,
    cond_ids: jax.Array,
    teacher: bool,
    use_cond: bool,
    talker_cache: Any = None,
    text_out: Any = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """一幀。cosyvoice2 時另帶 talker 的 KV 快取（`talker_cache`），回傳的 `out` 中含新快取；
    教師強制時 `text_out [B, 1]` 為這一幀的文字目標，自由執行時用這一幀貪婪選出的文字。"""
    model: SpeakLLM = nnx.merge(graphdef, state)
    cond = model.llm.embed(cond_ids) if use_cond else None
    x = model.frame_inputs(
        user_t, prev["text"], prev["tones"], prev["codes"], prev["codes_valid"], cond
    )
    hidden, cache = model.llm.forward_embeds(x, cache=cache)
    text_logits = model.llm.logits(hidden)
    turn_logits = model.turn_head(hidden).astype(jnp.float32)
    out = {"text": text_logits, "turn": turn_logits}
    if model.cfg.speech_head == "cosyvoice2":
        talker = model.speech_head
        if not teacher:
            text_out = jnp.argmax(text_logits, axis=-1).astype(jnp.int32)
        logits, out["talker_cache"] = talker.step(
            talker_cache, hidden, text_out, prev["codes"][..., 0], prev["codes_valid"]
        )
        if teacher:
            out["codes"] = logits[:, :, None]
            out["code_ids"] = codes_target
        else:
            out["code_ids"] = talker.greedy_codes(logits)[..., None]
    elif teacher:
        out["codes"] = model.speech_head(hidden, codes_target)
        out["code_ids"] = codes_target
    else:
        b = hidden.shape[0]
        out["code_ids"] = model.speech_head.generate(hidden.reshape(b, -1)).reshape(b, 1, -1)
    return cache, out


def run_streaming(
    model: SpeakLLM,
    features: Any,
    num_frames: int,
    chunk_frames: int,
    teacher: dict[str, Any] | None = None,
    cond_ids: Any = None,
    pad_id: int = 0,
) -> StreamOutputs:
    """逐幀執行整段對話。

    `features [B, n_mels, ≥4N]` 為使用者聲道梅爾；`chunk_frames` 為每區塊的 LLM 幀數（25 Hz）。
    `teacher` 給定時（`text_in [B,N]`、`tones_in [B,N,K]`、`codes_in [B,N,Q]`、`codes_in_valid [B,N]`、
    `codes_target [B,N,Q]`）以之作為助理上一幀的輸出；否則自由執行。
    `speech_head="cosyvoice2"` 時 talker 另以自己的 KV 快取逐幀前向；教師強制需要
    `teacher["text_out"] [B,N]`（與 `duplex_forward` 的 `text_out` 相同），自由執行時用每幀
    貪婪選出的文字。
    """
    features = jnp.asarray(features)
    b = features.shape[0]
    n = int(num_frames)
    stack = model.connector.stack
    chunk_enc = chunk_frames * stack
    graphdef, state = nnx.split(model)
    cache = model.llm.init_cache(b, n)
    k = model.cfg.max_chars_per_token
    q = model.cfg.speech.num_codebooks
    prev = {
        "text": jnp.full((b, 1), pad_id, jnp.int32),
        "tones": jnp.zeros((b, 1, k), jnp.int32),
        "codes": jnp.zeros((b, 1, q), jnp.int32),
        "codes_valid": jnp.zeros((b, 1), bool),
    }
    cosy = model.cfg.speech_head == "cosyvoice2"
    talker_cache = model.speech_head.init_cache(b, n) if cosy else None
    if cosy and teacher is not None and "text_out" not in teacher:
        raise ValueError("speech_head='cosyvoice2' 的教師強制串流需要 teacher['text_out']")
    use_cond = cond_ids is not None
    cond = jnp.zeros((b,), jnp.int32) if cond_ids is None else jnp.asarray(cond_ids, jnp.int32)
    text_l, turn_l, code_l, texts, turns, codes = [], [], [], [], [], []
    total_mel = features.shape[2]
    user = None
    for t in range(n):
        c = t // chunk_frames
        if t % chunk_frames == 0:
            mel_len = mel_frames_needed(c, chunk_frames, total_mel)
            user = _encode_prefix(graphdef, state, features, mel_len, chunk_enc)
        user_t = user[:, t : t + 1]
        if teacher is not None:
            prev = {
                "text": jnp.asarray(teacher["text_in"])[:, t : t + 1],
                "tones": jnp.asarray(teacher["tones_in"])[:, t : t + 1],
                "codes": jnp.asarray(teacher["codes_in"])[:, t : t + 1],
                "codes_valid": jnp.asarray(teacher["codes_in_valid"])[:, t : t + 1],
            }
            target = jnp.asarray(teacher["codes_target"])[:, t : t + 1]
            text_out = jnp.asarray(teacher["text_out"])[:, t : t + 1] if cosy else None
        else:
            target = jnp.zeros((b, 1, q), jnp.int32)
            text_out = None
        cache, out = _frame_step(
            graphdef,
            state,
            cache,
            user_t,
            prev,
            target,
            cond,
            teacher is not None,
            use_cond,
            talker_cache,
            text_out,
        )
        if cosy:
            talker_cache = out.pop("talker_cache")
        tok = jnp.argmax(out["text"][:, 0], axis=-1).astype(jnp.int32)
        act = jnp.argmax(out["turn"][:, 0], axis=-1).astype(jnp.int32)
        text_l.append(np.asarray(out["text"][:, 0]))
        turn_l.append(np.asarray(out["turn"][:, 0]))
        if "codes" in out:
            code_l.append(np.asarray(out["codes"][:, 0]))
        texts.append(np.asarray(tok))
        turns.append(np.asarray(act))
        codes.append(np.asarray(out["code_ids"][:, 0]))
        if teacher is None:
            # 自由執行：助理這一幀「在說話」時（輪替為 speak／continue／backchannel）語音碼才有效。
            speaking = jnp.isin(act, jnp.asarray(SPEAKING_ACTIONS))
            prev = {
                "text": tok[:, None],
                "tones": jnp.zeros((b, 1, k), jnp.int32),
                "codes": out["code_ids"],
                "codes_valid": speaking[:, None],
            }
    return StreamOutputs(
        text_logits=np.stack(text_l, 1),
        turn_logits=np.stack(turn_l, 1),
        code_logits=np.stack(code_l, 1) if code_l else None,
        text=np.stack(texts, 1),
        turn=np.stack(turns, 1),
        codes=np.stack(codes, 1),
    )
