"""文字與語音在 25 Hz 幀格上的交錯：聲調感知對齊（Tone-Aware）、雙尺度文字領先（Dual-Scale）、
以及 CosyVoice2 的固定比例雙流交錯。

幀格約定：一幀 40 ms（`FRAME_SECONDS`），幀 f 涵蓋時間 [0.04 f, 0.04 (f + 1))。
起點時間 t 落在幀 `seconds_to_frame(t) = floor(t / 0.04)`，終點時間 t（不含）對應
`seconds_to_end_frame(t) = ceil(t / 0.04)`；兩者都先加減 1e-6 以吸收浮點誤差。

聲調感知對齊的單位（unit）：每個漢字一個音節單位，每個英文詞一個單位，每個數字串一個單位；
標點與空白不佔時間。符號（BPE token）的錨點是「它第一個可發音字元所屬的單位」的起始幀：
一個合併多個漢字的符號整體放在第一個漢字的音節起點；英文詞被切成多個符號時，
後面的符號與第一個同錨點，再由「同幀順延」規則往後排；一個漢字的位元組被切到幾個符號時，
這幾個符號都錨定在該漢字的音節上（聲調仍只記在最後一個位元組所在的符號，與
`speakllm_jax.text.tones` 相同）。只有標點或空白的符號不佔音節，錨點等於前一個符號的錨點
（順延後落在前一個符號的下一幀）。多個符號落在同一幀時依序往後順延一幀（保持順序），
超出段尾時再從尾端往回收；錨點落在段外（語音被截斷）的符號不放入。
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import FRAME_SECONDS
from speakllm_jax.labels import IGNORE_ID, KIND_SOS, KIND_SPEECH, KIND_TASK, KIND_TEXT
from speakllm_jax.text.codeswitch import split_spans

_EPS = 1e-6


def seconds_to_frame(t: float) -> int:
    """起點時間（秒）所在的幀：floor(t / 0.04)。"""
    return int(math.floor(float(t) / FRAME_SECONDS + _EPS))


def seconds_to_end_frame(t: float) -> int:
    """終點時間（秒，不含）對應的幀上界：ceil(t / 0.04)。"""
    return int(math.ceil(float(t) / FRAME_SECONDS - _EPS))


def num_frames_for(num_samples: int, sample_rate: int) -> int:
    """音訊長度對應的幀數：ceil(samples / (sample_rate * 0.04))，最後不足一幀的部分也算一幀。"""
    hop = sample_rate * FRAME_SECONDS
    if abs(hop - round(hop)) > 1e-9:
        raise ValueError(f"取樣率 {sample_rate} 無法整除 40 ms 幀")
    return int(-(-int(num_samples) // int(round(hop))))


def token_char_spans(text: str, token_bytes: Sequence[bytes]) -> np.ndarray:
    """每個符號的位元組碰到的字元範圍 `[n, 2]`（起、迄，迄不含）。

    一個漢字的位元組被切到幾個符號時，這幾個符號的範圍都包含它（因此都錨定在它的音節上）；
    零長度的符號（特殊符號）得到空範圍 (c, c)，c 為其後第一個字元的位置。
    `token_bytes` 串接後必須等於 `text` 的 UTF-8 編碼。
    """
    data = text.encode("utf-8")
    if b"".join(token_bytes) != data:
        raise ValueError("token_bytes 串接後與 text 的 UTF-8 編碼不一致（文字需先做 NFC 正規化）")
    # 每個位元組屬於哪個字元
    char_of_byte = np.empty(len(data) + 1, dtype=np.int64)
    pos = 0
    for ci, ch in enumerate(text):
        k = len(ch.encode("utf-8"))
        char_of_byte[pos : pos + k] = ci
        pos += k
    char_of_byte[len(data)] = len(text)
    spans = np.zeros((len(token_bytes), 2), dtype=np.int64)
    pos = 0
    for t, b in enumerate(token_bytes):
        if len(b) == 0:
            spans[t] = (char_of_byte[pos], char_of_byte[pos])
        else:
            spans[t] = (char_of_byte[pos], char_of_byte[pos + len(b) - 1] + 1)
        pos += len(b)
    return spans


def speech_units(text: str) -> list[tuple[int, int]]:
    """文字的發音單位（字元範圍）：每個漢字、每個英文詞、每個數字串各一個；標點與空白略去。"""
    units: list[tuple[int, int]] = []
    for s in split_spans(text):
        if s.kind == "zh":
            units.extend((s.start + k, s.start + k + 1) for k in range(len(s.text)))
        elif s.kind in ("en", "num"):
            units.append((s.start, s.end))
    return units


def token_anchor_units(text: str, spans: np.ndarray) -> np.ndarray:
    """每個符號的錨點單位索引 `[n]`；不以單位為錨點的符號為 -1。

    範圍內有可發音字元的符號：第一個可發音字元所屬的單位。其餘符號（只有標點、空白，
    或零長度的特殊符號）為 -1，跟在前一個符號之後；但序列第一個符號改用其後第一個單位
    （之後也沒有單位時仍為 -1）。
    """
    units = speech_units(text)
    unit_of_char = np.full(len(text) + 1, -1, dtype=np.int64)
    for u, (a, b) in enumerate(units):
        unit_of_char[a:b] = u
    anchors = np.full(len(spans), -1, dtype=np.int64)
    for t, (a, b) in enumerate(np.asarray(spans, dtype=np.int64)):
        inside = unit_of_char[a:b]
        if np.any(inside >= 0):
            anchors[t] = inside[inside >= 0][0]
        elif t == 0:
            after = unit_of_char[a : len(text)]
            if np.any(after >= 0):
                anchors[t] = after[after >= 0][0]
    return anchors


def uniform_unit_frames(num_units: int, num_frames: int) -> np.ndarray:
    """沒有時間標註時，單位 u 的起始幀為 floor(u * N / U)。"""
    u = np.arange(num_units, dtype=np.int64)
    return (u * num_frames) // max(num_units, 1)


def _fit_increasing(frames: np.ndarray, lower: int, upper: int) -> np.ndarray:
    """把非遞減的錨點幀變成嚴格遞增並收進 [lower, upper)：先同幀順延，再從尾端往回收。"""
    out = np.asarray(frames, dtype=np.int64).copy()
    n = len(out)
    if n > upper - lower:
        raise ValueError(f"{n} 個文字符號放不進 {upper - lower} 個幀")
    prev = lower - 1
    for i in range(n):
        out[i] = max(out[i], prev + 1, lower)
        prev = out[i]
    nxt = upper
    for i in range(n - 1, -1, -1):
        out[i] = min(out[i], nxt - 1)
        nxt = out[i]
    return out


@dataclass
class FrameText:
    """放到幀格上的文字。

    `text_ids [N]`（無符號處為 pad_id）、`text_mask [N]`（bool）、`tones [N, K]`（無符號處為 0）、
    `token_frames [n]`：每個符號所在的幀，未放入（語音被截斷、錨點超出段落）的符號為 -1。
    """

    text_ids: np.ndarray
    text_mask: np.ndarray
    tones: np.ndarray
    token_frames: np.ndarray


def place_on_grid(
    token_ids: Any, token_tones: Any, token_frames: Any, num_frames: int, pad_id: int
) -> FrameText:
    """依 `token_frames`（-1 表示不放）把符號與聲調寫到長度 `num_frames` 的幀格上；幀不可重複。"""
    ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    tones = np.asarray(token_tones, dtype=np.int32)
    frames = np.asarray(token_frames, dtype=np.int64).reshape(-1)
    if tones.ndim != 2 or tones.shape[0] != len(ids):
        raise ValueError(f"token_tones 形狀應為 [{len(ids)}, K]，得到 {tones.shape}")
    if len(frames) != len(ids):
        raise ValueError(f"token_frames 長度 {len(frames)} 與符號數 {len(ids)} 不同")
    keep = frames >= 0
    if np.any(frames[keep] >= num_frames):
        raise ValueError(f"token_frames 超出幀數 {num_frames}")
    if len(np.unique(frames[keep])) != int(keep.sum()):
        raise ValueError("兩個符號落在同一幀")
    text_ids = np.full(num_frames, pad_id, dtype=np.int32)
    mask = np.zeros(num_frames, dtype=bool)
    grid_tones = np.zeros((num_frames, tones.shape[1]), dtype=np.int32)
    text_ids[frames[keep]] = ids[keep]
    mask[frames[keep]] = True
    grid_tones[frames[keep]] = tones[keep]
    return FrameText(text_ids, mask, grid_tones, frames.copy())


def tone_aware_token_frames(
    text: str,
    token_spans: Any,
    num_frames: int,
    unit_start_frames: Any | None = None,
    *,
    tone_aware: bool = True,
) -> np.ndarray:
    """每個符號在段落內的幀 `[n]`（相對段落起點；未放入為 -1）。

    `tone_aware=True`：錨點 = 第一個可發音字元所屬單位的起始幀（`unit_start_frames [U]`，
    缺省時 floor(u N / U) 均勻分布）；錨點 >= N 的符號（語音在此之前被截斷）不放入；
    其餘依序順延成嚴格遞增並收進 [0, N)。
    `tone_aware=False`（消融）：不看音節，符號 i 放在 floor(i N / n)。
    """
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    n = len(spans)
    if num_frames <= 0:
        raise ValueError(f"num_frames 必須 > 0，收到 {num_frames}")
    if not tone_aware:
        if n > num_frames:
            raise ValueError(f"{n} 個文字符號放不進 {num_frames} 個幀")
        return (np.arange(n, dtype=np.int64) * num_frames) // max(n, 1)
    units = speech_units(text)
    if unit_start_frames is None:
        starts = uniform_unit_frames(len(units), num_frames)
    else:
        starts = np.asarray(unit_start_frames, dtype=np.int64).reshape(-1)
        if len(starts) != len(units):
            raise ValueError(f"unit_start_frames 長度 {len(starts)} 與發音單位數 {len(units)} 不同")
        if np.any(np.diff(starts) < 0) or (len(starts) and starts[0] < 0):
            raise ValueError("unit_start_frames 必須非負且非遞減")
    anchors = token_anchor_units(text, spans)
    anchor_frames = np.zeros(n, dtype=np.int64)
    for t in range(n):
        if anchors[t] >= 0:
            anchor_frames[t] = starts[anchors[t]]
        else:
            # 標點、空白：緊跟前一個符號（由順延規則放到其後一幀）
            anchor_frames[t] = anchor_frames[t - 1] if t > 0 else 0
    # 單位依文字順序排列，錨點應非遞減；保險起見取累積最大值
    if n:
        anchor_frames = np.maximum.accumulate(anchor_frames)
    out = np.full(n, -1, dtype=np.int64)
    # 錨點落在段外（語音在此之前被截斷）的符號不放入；錨點非遞減，因此放入的是一段前綴
    idx = np.flatnonzero(anchor_frames < num_frames)
    if len(idx) < n:
        # 已有截斷時，段內放不下的符號也一併視為被截斷（只留前 N 個）
        idx = idx[:num_frames]
    if len(idx):
        out[idx] = _fit_increasing(anchor_frames[idx], 0, num_frames)
    return out


def align_text_to_frames(
    token_ids: Any,
    token_tones: Any,
    token_spans: Any,
    text: str,
    num_frames: int,
    *,
    unit_start_frames: Any | None = None,
    pad_id: int,
    tone_aware: bool = True,
) -> FrameText:
    """聲調感知交錯對齊：把一段助理文字的符號放到 N 幀的語音段上。

    `token_ids [n]`、`token_tones [n, K]`（`TextTokenizer.encode_with_tones` 的 ids／tones）、
    `token_spans [n, 2]`（`token_char_spans`）。`tone_aware=False` 為消融：均勻放置且聲調全為 0。
    """
    frames = tone_aware_token_frames(
        text, token_spans, num_frames, unit_start_frames, tone_aware=tone_aware
    )
    tones = np.asarray(token_tones, dtype=np.int32)
    if not tone_aware:
        tones = np.zeros_like(tones)
    return place_on_grid(token_ids, tones, frames, num_frames, pad_id)


def encode_for_alignment(tokenizer: Any, text: str, max_chars_per_token: int = 4) -> dict[str, Any]:
    """以 `TextTokenizer` 編碼並附上字元範圍：回傳 ids [n]、tones [n, K]、spans [n, 2]、text（NFC）。"""
    text = unicodedata.normalize("NFC", text)
    enc = tokenizer.encode_with_tones(text, max_chars_per_token)
    spans = token_char_spans(text, tokenizer.token_bytes(enc["ids"]))
    return {"ids": enc["ids"], "tones": enc["tones"], "spans": spans, "text": text}


def apply_text_lead(text_frames: Any, lead: int, segment_start: int = 0) -> np.ndarray:
    """雙尺度規劃：文字計畫比語音碼提早 `lead` 幀。

    放在幀 f 的符號移到 max(f - lead, segment_start)，再依序順延成嚴格遞增（保持順序與唯一）。
    -1（未放入）保持 -1。`lead = 0` 即消融（輸出等於輸入）。
    """
    if lead < 0:
        raise ValueError(f"lead 必須 >= 0，收到 {lead}")
    f = np.asarray(text_frames, dtype=np.int64).reshape(-1)
    out = f.copy()
    keep = f >= 0
    if not keep.any() or lead == 0:
        return out
    kept = f[keep]
    if np.any(np.diff(kept) <= 0):
        raise ValueError("text_frames 必須嚴格遞增")
    if kept[0] < segment_start:
        raise ValueError(f"text_frames 從 {kept[0]} 開始，早於 segment_start={segment_start}")
    moved = np.maximum(kept - lead, segment_start)
    prev = segment_start - 1
    for i in range(len(moved)):
        moved[i] = max(moved[i], prev + 1)
        prev = moved[i]
    out[keep] = moved
    return out


# CosyVoice2 的輸入種類 KIND_*（查不同的嵌入表）定義在 `speakllm_jax.labels`。


def interleave_fixed(
    text_ids: Any,
    speech_ids: Any,
    n_text: int = 5,
    n_speech: int = 15,
    *,
    fill_id: int,
    task_id: int,
    eos_id: int,
    sos_id: int | None = None,
    mode: str = "auto",
    text_chunks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """CosyVoice2 的固定比例交錯（訓練序列的輸入與目標）。

    參考：FunAudioLLM/CosyVoice `cosyvoice/llm/llm.py` 的 `Qwen2LM.prepare_lm_input_target`
    （此處為獨立重寫，不含隨機選擇）。

    bistream（`mode="bistream"`，或 `"auto"` 且 S / T > n_speech / n_text）：
    共 ceil((T + 1) / n_text) 塊；第 j 塊若有完整 n_text 個文字符號，輸入為這 n_text 個文字
    再接 n_speech 個語音符號，目標為 (n_text - 1) 個忽略、這 n_speech 個語音符號、再一個 `fill_id`
    （最後一個語音符號之後要預測填充符號，表示「換文字」）；否則（最後一塊，文字不足 n_text，可為 0 個）
    輸入為剩下的文字、`task_id`、剩下的全部語音，目標為剩下文字數個忽略、剩下的語音、`eos_id`。
    unistream（`mode="unistream"`，或 `"auto"` 且比例不夠）：輸入 [文字..., task_id, 語音...]，
    目標 [忽略 × T, 語音..., eos_id]。
    `sos_id` 給定時序列最前面加一個 sos 輸入（目標忽略）。

    `text_chunks`（選用）明確指定 bistream 各完整塊的文字數 c_j（每塊之後仍接 n_speech 個語音
    與一個 fill，目標為 c_j - 1 個忽略），剩下的文字放進最後一塊（接 task_id）；例如
    `tone_aware_text_chunks` 的結果。缺省為 [n_text] × floor(T / n_text)，即與參考完全相同。
    給定時 bistream 另需 語音數 > n_speech × 塊數（最後一塊至少一個語音符號）。

    回傳 `input_ids [L]`、`input_kind [L]`（KIND_TEXT／KIND_SPEECH／KIND_SOS／KIND_TASK）、
    `target_ids [L]`（IGNORE_ID = -1 表示不計損失；語音、fill、eos 共用語音詞表編號）、`mode`。
    位置 p 的目標是位置 p 的輸入之後應出現的下一個語音側符號（下一符號預測）。
    """
    text = [int(x) for x in np.asarray(text_ids).reshape(-1)]
    speech = [int(x) for x in np.asarray(speech_ids).reshape(-1)]
    T, S = len(text), len(speech)
    if T == 0:
        raise ValueError("text_ids 為空")
    if n_text <= 0 or n_speech <= 0:
        raise ValueError("n_text 與 n_speech 必須 > 0")
    ratio_ok = S * n_text > T * n_speech  # S / T > n_speech / n_text
    if text_chunks is None:
        chunks = [n_text] * (T // n_text)
    else:
        chunks = [int(c) for c in text_chunks]
        if any(c <= 0 for c in chunks) or sum(chunks) > T:
            raise ValueError(f"text_chunks {chunks} 必須皆 > 0 且總和 ≤ 文字數 {T}")
        ratio_ok = ratio_ok and S > n_speech * len(chunks)
    if mode == "auto":
        mode = "bistream" if ratio_ok else "unistream"
    elif mode == "bistream" and not ratio_ok:
        raise ValueError(f"bistream 需要 語音數/文字數 > {n_speech}/{n_text}，得到 {S}/{T}")
    elif mode not in ("bistream", "unistream"):
        raise ValueError(f"未知的 mode {mode!r}")
    inp: list[int] = []
    kind: list[int] = []
    tgt: list[int] = []
    if sos_id is not None:
        inp.append(int(sos_id))
        kind.append(KIND_SOS)
        tgt.append(IGNORE_ID)

    def push(ids: list[int], k: int) -> None:
        inp.extend(ids)
        kind.extend([k] * len(ids))

    if mode == "unistream":
        push(text, KIND_TEXT)
        push([int(task_id)], KIND_TASK)
        push(speech, KIND_SPEECH)
        tgt.extend([IGNORE_ID] * T + speech + [int(eos_id)])
    else:
        # 完整塊：c_j 個文字 + n_speech 個語音，目標 [忽略 × (c_j - 1), 語音, fill]；
        # 最後一塊：剩下的文字（可為 0 個）+ task_id + 剩下的全部語音，目標 [忽略 × 文字數, 語音, eos]。
        # 預設 c_j = n_text，塊數 floor(T / n_text) + 1 = ceil((T + 1) / n_text)，與參考相同。
        pt = ps = 0
        for c in chunks:
            t_chunk = text[pt : pt + c]
            s_chunk = speech[ps : ps + n_speech]
            push(t_chunk, KIND_TEXT)
            push(s_chunk, KIND_SPEECH)
            tgt.extend([IGNORE_ID] * (c - 1) + s_chunk + [int(fill_id)])
            pt, ps = pt + c, ps + n_speech
        t_chunk, rest = text[pt:], speech[ps:]
        push(t_chunk, KIND_TEXT)
        push([int(task_id)], KIND_TASK)
        push(rest, KIND_SPEECH)
        tgt.extend([IGNORE_ID] * len(t_chunk) + rest + [int(eos_id)])
    if len(inp) != len(tgt):
        raise AssertionError("輸入與目標長度不一致")
    return {
        "input_ids": np.asarray(inp, dtype=np.int32),
        "input_kind": np.asarray(kind, dtype=np.int32),
        "target_ids": np.asarray(tgt, dtype=np.int32),
        "mode": mode,
    }


def tone_aware_text_chunks(
    text: str,
    token_spans: Any,
    n_text: int = 5,
    *,
    max_shift: int = 2,
    num_speech: int | None = None,
    n_speech: int = 15,
) -> list[int]:
    """聲調感知的 CosyVoice2 文字塊大小：每塊約 `n_text` 個符號，但不把一個漢字切到兩塊。

    `token_spans [T, 2]` 為 `token_char_spans` 的結果。符號 b - 1 與 b 之間的邊界 b「合法」
    若兩者不共用字元（一個漢字的位元組被 BPE 切到兩個符號時，兩符號之間不合法）；合法邊界的
    字元位置不在任何發音單位（`speech_units`：漢字、英文詞、數字串）內部時為「音節邊界」。
    由 p = 0 起，只要剩下的符號 ≥ n_text 就再切一塊：目標邊界 p + n_text，在
    [p + n_text - max_shift, p + n_text + max_shift]（夾在 (p, T] 內）中取
    （非音節邊界, 與目標的距離, 位置）最小的合法邊界；視窗內沒有合法邊界時取距離最近的
    合法邊界（T 永遠合法）。`num_speech` 給定時塊數保持 n_speech × 塊數 < num_speech。
    回傳各完整塊的文字數（剩下的文字歸最後一塊），可直接作為 `interleave_fixed` 的
    `text_chunks`；每個目標邊界都是音節邊界時結果就是 [n_text] × floor(T / n_text)（參考行為）。
    """
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    n = len(spans)
    if n_text <= 0 or max_shift < 0:
        raise ValueError("n_text 必須 > 0 且 max_shift 必須 ≥ 0")
    inside_unit = np.zeros(len(text) + 1, dtype=bool)
    for a, e in speech_units(text):
        inside_unit[a + 1 : e] = True

    def legal(b: int) -> bool:
        return b == n or b == 0 or spans[b - 1, 1] <= spans[b, 0]

    def non_syllable(b: int) -> bool:
        return b < n and bool(inside_unit[spans[b, 0]])

    chunks: list[int] = []
    p = 0
    while n - p >= n_text:
        if num_speech is not None and n_speech * (len(chunks) + 1) >= num_speech:
            break
        target = p + n_text
        window = range(max(p + 1, target - max_shift), min(n, target + max_shift) + 1)
        cands = [b for b in window if legal(b)]
        if not cands:
            cands = [b for b in range(p + 1, n + 1) if legal(b)]
            best = min(cands, key=lambda b: (abs(b - target), b))
        else:
            best = min(cands, key=lambda b: (non_syllable(b), abs(b - target), b))
        chunks.append(best - p)
        p = best
    return chunks
