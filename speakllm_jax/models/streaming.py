"""全雙工幀模型的 JAX 串流推論：逐 40 ms 幀前進、LLM 用 KV 快取、Whisper 以區塊編碼。

這是評估與 PyTorch 服務端行為的參考實作。每個區塊（`chunk_frames` 個 LLM 幀）：
使用者聲道的梅爾累積到足夠後編碼這一區塊，取出這一區塊的使用者串流；然後逐幀呼叫單一
編譯好的 `frame_step`：組輸入 → LLM 一步（KV 快取）→ 各頭。

長對話的方案（`SpeakLLMConfig` 的欄位，與訓練的整段前向同一個遮罩）：

- `encoder_left_chunks = L ≥ 1`：編碼器帶 KV 快取逐區塊編碼（`SpeakLLM.stream_audio`），
  每區塊只看左方 L 個區塊，成本與記憶體固定；位置為框號對 `max_source_positions` 取模。
  `L = 0` 時退回舊作法：每區塊以區塊因果遮罩重新編碼目前為止的整段音訊（成本隨長度增長，
  且限 30 秒）。
- `llm_window_frames = W > 0`：LLM 用環狀 KV 快取，每幀看最前面 `llm_sink_frames` 幀
  （注意力槽）與含自己在內最近的 W 幀；RoPE 位置不重設，一直增長。

`encoder_left_chunks = 0`（舊匯出）時改用下面的切窗作法。

任意長度：Whisper 編碼器一次最多 `max_source_positions` 個輸出框（30 秒）。更長的音訊切成
連續、不重疊的編碼窗（`encoder_window_frames`：窗長為編碼器上限內最多的整區塊數，預設 750 幀
＝ 30 秒），每窗獨立編碼（位置表從 0 起，與訓練時 ≤ 30 秒的片段相同；窗的最後一框沒有跨窗的
前瞻），各窗的幀特徵依序串接；LLM 的 KV 快取則跨窗連續，整段對話只有一個上下文。
不超過一窗的音訊與不切窗完全相同。

助理上一幀的輸出可以是模型自己的（自由執行：貪婪選文字與輪替、深度 Transformer 產生語音碼），
也可以由呼叫端給定（教師強制）；教師強制時每幀的 logits 與 `SpeakLLM.duplex_forward`
以同一區塊遮罩做整段前向的結果相同（測試驗證）。

Whisper 梅爾的正規化（整段最大值減 8 的下限）不是因果的：這裡假設呼叫端給的是整段計算好的
梅爾，或因果正規化的串流梅爾（`speakllm_jax.audio.features.IncrementalLogMel`，PyTorch 的
`Streamer` 用它：下限為目前為止的最大值減 8，框輸出後不再改變）。
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.models.speakllm import SpeakLLM
from speakllm_jax.turn_policy import TurnDecider, TurnRule, is_speaking


@dataclass
class StreamOutputs:
    """串流結果（N 幀）。"""

    text_logits: np.ndarray | None  # [B, N, V]（keep_text_logits=False 時為 None）
    turn_logits: np.ndarray  # [B, N, 5]
    code_logits: np.ndarray | None  # [B, N, Q, C]（教師強制時）
    text: np.ndarray  # [B, N] 每幀輸出的文字符號
    turn: np.ndarray  # [B, N] 每幀的輪替動作
    codes: np.ndarray  # [B, N, Q] 每幀的語音碼


def mel_frames_needed(chunk_index: int, chunk_frames: int, total_mel: int) -> int:
    """編碼第 `chunk_index` 個區塊（LLM 幀）所需的梅爾框數：含卷積的 1 框前瞻。"""
    return min(4 * chunk_frames * (chunk_index + 1) + 1, total_mel)


def encoder_window_frames(model: SpeakLLM, chunk_frames: int = 1) -> int:
    """一個編碼窗最多幾個 LLM 幀：編碼器上限 `max_source_positions` 個輸出框 ÷ `connector.stack`，
    向下取到 `chunk_frames` 的倍數（區塊不跨窗）。"""
    per_window = model.encoder.config.max_source_positions // model.connector.stack
    w = per_window // int(chunk_frames) * int(chunk_frames)
    if w < 1:
        raise ValueError(
            f"chunk_frames={chunk_frames} 大於編碼器一窗可容納的 {per_window} 個 LLM 幀"
        )
    return w


@partial(jax.jit, static_argnames=("graphdef", "chunk_enc"))
def _encode_window(
    graphdef: Any, state: Any, mel: jax.Array, mask: jax.Array, chunk_enc: int | None
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    user, _ = model.encode_audio(mel, mask, chunk_frames=chunk_enc)
    return user


def encode_user_stream(
    model: SpeakLLM,
    features: Any,
    num_frames: int,
    chunk_frames: int | None = None,
    window_frames: int | None = None,
) -> jax.Array:
    """使用者聲道梅爾 `[B, n_mels, ≥4N]` → 幀特徵 `[B, N, d]`，逐編碼窗編碼後串接（見模組說明）。

    `chunk_frames`（LLM 幀）給定時窗內用區塊因果遮罩（串流），否則窗內全注意力（與訓練的
    `duplex_forward` 相同）。每窗補零到固定長度並以鍵遮罩遮掉補齊處，所有窗共用一次編譯。
    """
    features = jnp.asarray(features)
    b, n_mels, _ = features.shape
    n = int(num_frames)
    stack = model.connector.stack
    mel_per_frame = 2 * stack
    w = int(window_frames or encoder_window_frames(model, chunk_frames or 1))
    chunk_enc = None if chunk_frames is None else int(chunk_frames) * stack
    graphdef, state = nnx.split(model)
    parts = []
    for start in range(0, n, w):
        stop = min(start + w, n)
        mel = features[:, :, start * mel_per_frame : stop * mel_per_frame]
        real = mel.shape[2]
        mel = jnp.pad(mel, ((0, 0), (0, 0), (0, w * mel_per_frame - real)))
        mask = jnp.broadcast_to(jnp.arange(w * mel_per_frame) < real, (b, w * mel_per_frame))
        user = _encode_window(graphdef, state, mel, mask, chunk_enc)
        parts.append(user[:, : stop - start])
    if not parts:
        raise ValueError("num_frames 必須 ≥ 1")
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def mel_chunk(features: jax.Array, chunk: int, chunk_enc: int) -> tuple[jax.Array, int]:
    """第 `chunk` 個區塊的梅爾視窗 `[B, n_mels, 2·chunk_enc + 1]`（含一框前瞻，超出處補零）
    與其中真實的框數。"""
    size = 2 * chunk_enc + 1
    lo = 2 * chunk_enc * chunk
    win = features[:, :, lo : lo + size]
    valid = int(win.shape[2])
    if valid < size:
        win = jnp.pad(win, ((0, 0), (0, 0), (0, size - valid)))
    return win, valid


@partial(jax.jit, static_argnames=("graphdef",))
def _encode_chunk(
    graphdef: Any, state: Any, enc_state: Any, mel: jax.Array, valid: jax.Array
) -> tuple[jax.Array, Any]:
    model = nnx.merge(graphdef, state)
    return model.stream_audio(enc_state, mel, valid)


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
    keep_text_logits: bool = True,
    turn_rule: TurnRule | None = None,
) -> StreamOutputs:
    """逐幀執行整段對話（任意長度：使用者聲道逐編碼窗編碼，見模組說明）。

    `features [B, n_mels, ≥4N]` 為使用者聲道梅爾；`chunk_frames` 為每區塊的 LLM 幀數（25 Hz）。
    `teacher` 給定時（`text_in [B,N]`、`tones_in [B,N,K]`、`codes_in [B,N,Q]`、`codes_in_valid [B,N]`、
    `codes_target [B,N,Q]`）以之作為助理上一幀的輸出；否則自由執行。
    `speech_head="cosyvoice2"` 時 talker 另以自己的 KV 快取逐幀前向；教師強制需要
    `teacher["text_out"] [B,N]`（與 `duplex_forward` 的 `text_out` 相同），自由執行時用每幀
    貪婪選出的文字。`keep_text_logits=False` 時不保留每幀的文字 logits（`text_logits` 為 None；
    長對話時 `[B, N, V]` 很大），評估只需要輪替與文字符號。
    每幀的輪替動作由 `speakllm_jax.turn_policy.TurnDecider`（規則 `turn_rule`，缺省為 `TurnRule()`）
    從輪替 logits 決定，與 PyTorch 孿生、伺服器的 `policy="model"` 同一個規則；教師強制時也照樣
    逐幀決策（但不回饋）。
    """
    features = jnp.asarray(features)
    b = features.shape[0]
    n = int(num_frames)
    graphdef, state = nnx.split(model)
    cache = model.llm.init_cache(b, n, window=model.cfg.llm_window)
    streamed = model.cfg.encoder_left_chunks > 0
    enc_state = model.init_audio_stream(b, chunk_frames) if streamed else None
    k = model.cfg.max_chars_per_token
    q = model.cfg.speech.num_codebooks
    prev = {
        "text": jnp.full((b, 1), pad_id, jnp.int32),
        "tones": jnp.zeros((b, 1, k), jnp.int32),
        "codes": jnp.zeros((b, 1, q), jnp.int32),
        "codes_valid": jnp.zeros((b, 1), bool),
    }
    cosy = model.cfg.speech_head == "cosyvoice2"
    window = model.cfg.llm_window
    talker_cache = model.speech_head.init_cache(b, n, window=window) if cosy else None
    if cosy and teacher is not None and "text_out" not in teacher:
        raise ValueError("speech_head='cosyvoice2' 的教師強制串流需要 teacher['text_out']")
    use_cond = cond_ids is not None
    cond = jnp.zeros((b,), jnp.int32) if cond_ids is None else jnp.asarray(cond_ids, jnp.int32)
    text_l, turn_l, code_l, texts, turns, codes = [], [], [], [], [], []
    deciders = [TurnDecider(turn_rule) for _ in range(b)]
    chunk_enc = chunk_frames * model.connector.stack
    user = None if streamed else encode_user_stream(model, features, n, chunk_frames)
    for t in range(n):
        if streamed:
            if t % chunk_frames == 0:
                win, valid = mel_chunk(features, t // chunk_frames, chunk_enc)
                user, enc_state = _encode_chunk(graphdef, state, enc_state, win, jnp.int32(valid))
            user_t = user[:, t % chunk_frames : t % chunk_frames + 1]
        else:
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
        turn_np = np.asarray(out["turn"][:, 0])
        act = np.asarray([d.step(row) for d, row in zip(deciders, turn_np)], np.int32)
        if keep_text_logits:
            text_l.append(np.asarray(out["text"][:, 0]))
        turn_l.append(turn_np)
        if "codes" in out:
            code_l.append(np.asarray(out["codes"][:, 0]))
        texts.append(np.asarray(tok))
        turns.append(act)
        codes.append(np.asarray(out["code_ids"][:, 0]))
        if teacher is None:
            # 自由執行：助理這一幀「在說話」時（輪替為 speak／continue／backchannel）語音碼才有效。
            speaking = jnp.asarray([is_speaking(a) for a in act])
            prev = {
                "text": tok[:, None],
                "tones": jnp.zeros((b, 1, k), jnp.int32),
                "codes": out["code_ids"],
                "codes_valid": speaking[:, None],
            }
    return StreamOutputs(
        text_logits=np.stack(text_l, 1) if text_l else None,
        turn_logits=np.stack(turn_l, 1),
        code_logits=np.stack(code_l, 1) if code_l else None,
        text=np.stack(texts, 1),
        turn=np.stack(turns, 1),
        codes=np.stack(codes, 1),
    )
