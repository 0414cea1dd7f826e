"""全雙工訓練樣本：把一列雙聲道對話清單（聲道 0 使用者、聲道 1 助理）變成 25 Hz 幀格上的陣列。

`build_duplex_example(row, tokenizer, config, codes=None)` 回傳 `DuplexExample`，決定性（同輸入同輸出）：

- 幀數 N = ceil(取樣數 / 640)（16 kHz、40 ms）；兩個聲道補零到 N·640 個取樣。
- 助理文字：每個助理發言段（kind 不是 backchannel）的文字經 `TextTokenizer` 編碼，
  以聲調感知對齊放在該段的幀上（`interleave.align_text_to_frames`），再整體提早 `lead_frames` 幀
  （`apply_text_lead`，下限為 max(段起點 - lead, 上一段最後一個文字幀 + 1, 0)）。
  被搶話截斷的段（kind "interrupted"）：音訊只有前半，文字卻是整句，因此音節起點以同一段對話中
  完整助理段的平均每單位幀數推算（沒有完整段時退回整段均勻分布），超出段尾的符號不放入。
- 輪替目標與權重：`data.overlap.overlap_aware_targets`；搶話後語音權重為 0 的幀，`text_mask` 也設為 False
  （`text_ids` 不變，方便比對）。
- 語音碼：`codes [Q, M]`（Voila Q=4，第一個碼本為語義碼本；CosyVoice2 Q=1）由助理聲道抽出，
  可選；M 與 N 最多差 2 幀，不足補 0 且權重為 0。
  沒有給 codes 時 codes 全 0、`code_weight` 全 0。`code_weight = speech_weight · 有碼`。

消融開關：`tone_aware=False`（均勻放置、聲調為 0）、`lead_frames=0`（無領先）、
`overlap.ablation=True`（純輪替目標、權重全 1），各自只關掉對應模組。
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import FRAME_SAMPLES, SAMPLE_RATE
from speakllm_jax.data.interleave import (
    FRAME_SECONDS,
    align_text_to_frames,
    apply_text_lead,
    encode_for_alignment,
    num_frames_for,
    place_on_grid,
    seconds_to_end_frame,
    seconds_to_frame,
    speech_units,
)
from speakllm_jax.data.overlap import OverlapConfig, overlap_aware_targets

NUM_CODEBOOKS = 4
SAMPLES_PER_FRAME = FRAME_SAMPLES  # 640


@dataclass(frozen=True)
class DuplexConfig:
    """全雙工樣本的設定（各研究模組的開關都在這裡）。"""

    lead_frames: int = 2
    tone_aware: bool = True
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    max_chars_per_token: int = 4
    normalize: str | None = "t2s"  # 訓練目標的繁轉簡；None 表示保留原文
    sample_rate: int = SAMPLE_RATE
    code_tolerance_frames: int = 2
    # 每幀的語音碼層數：Voila 為 4（RVQ），CosyVoice2 為 1（FSQ 單碼本）。
    num_codebooks: int = NUM_CODEBOOKS


@dataclass
class DuplexExample:
    """一段對話在 25 Hz 幀格上的訓練樣本（N = num_frames，K = 每符號最多漢字數）。"""

    id: str
    num_frames: int
    user_audio: np.ndarray  # [N * 640] float32，聲道 0（給 Whisper 編碼器）
    assistant_audio: np.ndarray  # [N * 640] float32，聲道 1
    text_ids: np.ndarray  # [N] int32，無文字幀為 pad_id
    text_mask: np.ndarray  # [N] bool
    text_tones: np.ndarray  # [N, K] int32
    token_frames: list[np.ndarray]  # 每個助理段一個 [n_j]（領先後；未放入為 -1）
    token_frames_no_lead: list[np.ndarray]  # 同上，領先前
    turn_targets: np.ndarray  # [N] int32（TurnAction）
    turn_weight: np.ndarray  # [N] float32
    speech_weight: np.ndarray  # [N] float32
    codes: np.ndarray  # [Q, N] int32（Voila Q=4，CosyVoice2 Q=1）
    code_weight: np.ndarray  # [N] float32
    user_turns: np.ndarray  # [U, 2] int64，使用者發言段 [起, 迄) 幀（不含附和）
    assistant_turns: np.ndarray  # [A, 2] int64，助理發言段 [起, 迄) 幀
    barge_in_frames: np.ndarray  # [B] int64

    def arrays(self) -> dict[str, np.ndarray]:
        """給資料管線用的固定欄位（不含音訊與不定長清單）。"""
        return {
            "text_ids": self.text_ids,
            "text_mask": self.text_mask,
            "text_tones": self.text_tones,
            "turn_targets": self.turn_targets,
            "turn_weight": self.turn_weight,
            "speech_weight": self.speech_weight,
            "codes": self.codes,
            "code_weight": self.code_weight,
        }


def _frame_span(turn: dict[str, Any], n: int) -> tuple[int, int]:
    s = min(max(seconds_to_frame(turn["start"]), 0), n)
    return s, min(max(seconds_to_end_frame(turn["end"]), s), n)


def _load_stereo(row: dict[str, Any], sr: int) -> np.ndarray:
    from speakllm_jax.audio.io import load_audio

    path = row.get("audio")
    if not path:
        raise ValueError(f"{row.get('id', '?')}: 清單列缺少欄位 'audio'")
    wave = load_audio(
        path,
        target_sr=sr,
        offset=float(row.get("offset", 0.0)),
        duration=row.get("duration"),
        mono=False,
    )
    if wave.ndim != 2 or wave.shape[0] != 2:
        raise ValueError(f"{path}: 全雙工對話需要雙聲道音訊，得到形狀 {wave.shape}")
    roles = row.get("channel_roles", ["user", "assistant"])
    if list(roles) != ["user", "assistant"]:
        if list(roles) == ["assistant", "user"]:
            wave = wave[::-1]
        else:
            raise ValueError(f"{path}: channel_roles 應為 ['user', 'assistant']，得到 {roles}")
    return wave


def _prepare_text(text: str, normalize: str | None) -> str:
    if normalize is None:
        return text
    from speakllm_jax.text.normalize import normalize_zh

    return normalize_zh(text, normalize)


def build_duplex_example(
    row: dict[str, Any],
    tokenizer: Any,
    config: DuplexConfig | None = None,
    codes: np.ndarray | None = None,
    pad_id: int | None = None,
    wave: np.ndarray | None = None,
) -> DuplexExample:
    """由一列對話清單（`adapters` 的 dialogue 列：audio、turns、overlaps）建立 `DuplexExample`。

    `tokenizer` 為 `TextTokenizer`；`pad_id` 缺省為其 eos（`<|endoftext|>`）。
    `wave [2, S]` 可直接給（已載入的雙聲道 16 kHz 音訊），否則從 `row["audio"]` 讀取。
    """
    cfg = config or DuplexConfig()
    rid = str(row.get("id", "?"))
    for k in ("turns", "overlaps"):
        if k not in row:
            raise ValueError(f"{rid}: 清單列缺少欄位 {k!r}")
    if wave is None:
        wave = _load_stereo(row, cfg.sample_rate)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 2 or wave.shape[0] != 2:
        raise ValueError(f"{rid}: wave 形狀應為 [2, samples]，得到 {wave.shape}")
    hop = int(round(cfg.sample_rate * FRAME_SECONDS))
    n = num_frames_for(wave.shape[1], cfg.sample_rate)
    padded = np.zeros((2, n * hop), dtype=np.float32)
    padded[:, : wave.shape[1]] = wave
    pad = int(tokenizer.eos_id if pad_id is None else pad_id)
    turns = sorted(row["turns"], key=lambda t: (float(t["start"]), str(t["speaker"])))

    # 助理文字
    a_turns = [
        t for t in turns if t.get("speaker") == "assistant" and t.get("kind") != "backchannel"
    ]
    encs = [
        encode_for_alignment(
            tokenizer, _prepare_text(str(t.get("text", "")), cfg.normalize), cfg.max_chars_per_token
        )
        for t in a_turns
    ]
    spans = [_frame_span(t, n) for t in a_turns]
    # 完整段的平均每單位幀數（給被截斷的段推算音節起點）
    rates = [
        (e - s) / len(speech_units(enc["text"]))
        for t, enc, (s, e) in zip(a_turns, encs, spans)
        if t.get("kind") != "interrupted" and e > s and speech_units(enc["text"])
    ]
    rate = float(np.mean(rates)) if rates else None
    all_ids, all_tones, all_frames = [], [], []
    frames_no_lead: list[np.ndarray] = []
    frames_lead: list[np.ndarray] = []
    floor = 0
    for t, enc, (s, e) in zip(a_turns, encs, spans):
        length = e - s
        if length <= 0 or len(enc["ids"]) == 0:
            frames_no_lead.append(np.full(len(enc["ids"]), -1, dtype=np.int64))
            frames_lead.append(frames_no_lead[-1].copy())
            continue
        units = speech_units(enc["text"])
        unit_frames = None
        if t.get("kind") == "interrupted" and rate is not None and cfg.tone_aware:
            unit_frames = np.floor(np.arange(len(units)) * rate + 1e-6).astype(np.int64)
        local = align_text_to_frames(
            enc["ids"],
            enc["tones"],
            enc["spans"],
            enc["text"],
            length,
            unit_start_frames=unit_frames,
            pad_id=pad,
            tone_aware=cfg.tone_aware,
        )
        f0 = np.where(local.token_frames >= 0, local.token_frames + s, -1)
        seg_floor = max(s - cfg.lead_frames, floor, 0)
        f1 = apply_text_lead(f0, cfg.lead_frames, segment_start=seg_floor)
        frames_no_lead.append(f0)
        frames_lead.append(f1)
        placed = f1[f1 >= 0]
        if len(placed):
            floor = int(placed.max()) + 1
        all_ids.append(enc["ids"])
        all_tones.append(enc["tones"])
        all_frames.append(f1)
    k = cfg.max_chars_per_token
    if all_ids:
        tones = np.concatenate([np.asarray(x, np.int32).reshape(-1, k) for x in all_tones])
        if not cfg.tone_aware:
            tones = np.zeros_like(tones)
        grid = place_on_grid(np.concatenate(all_ids), tones, np.concatenate(all_frames), n, pad)
    else:
        grid = place_on_grid(
            np.zeros(0, np.int32), np.zeros((0, k), np.int32), np.zeros(0, np.int64), n, pad
        )

    # 輪替目標與權重
    ft = overlap_aware_targets(turns, row["overlaps"], n, cfg.overlap)

    # 搶話後被遮掉語音的幀，文字計畫也不再當作目標（助理應該已經停下）
    text_mask = grid.text_mask.copy()
    if not cfg.overlap.ablation:
        text_mask &= ft.speech_weight > 0

    # 語音碼
    q = int(cfg.num_codebooks)
    code_arr = np.zeros((q, n), dtype=np.int32)
    has_code = np.zeros(n, dtype=np.float32)
    if codes is not None:
        c = np.asarray(codes)
        if c.ndim != 2 or c.shape[0] != q:
            raise ValueError(f"{rid}: codes 形狀應為 [{q}, N]，得到 {c.shape}")
        if abs(c.shape[1] - n) > cfg.code_tolerance_frames:
            raise ValueError(f"{rid}: codes 有 {c.shape[1]} 幀，音訊為 {n} 幀")
        m = min(c.shape[1], n)
        code_arr[:, :m] = c[:, :m]
        has_code[:m] = 1.0
    user_turns = np.asarray(
        [
            _frame_span(t, n)
            for t in turns
            if t.get("speaker") == "user" and t.get("kind") != "backchannel"
        ],
        dtype=np.int64,
    ).reshape(-1, 2)
    return DuplexExample(
        id=rid,
        num_frames=n,
        user_audio=padded[0],
        assistant_audio=padded[1],
        text_ids=grid.text_ids,
        text_mask=text_mask,
        text_tones=grid.tones,
        token_frames=frames_lead,
        token_frames_no_lead=frames_no_lead,
        turn_targets=ft.turn_targets,
        turn_weight=ft.turn_weight,
        speech_weight=ft.speech_weight,
        codes=code_arr,
        code_weight=ft.speech_weight * has_code,
        user_turns=user_turns,
        assistant_turns=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        barge_in_frames=ft.barge_in_frames,
    )
