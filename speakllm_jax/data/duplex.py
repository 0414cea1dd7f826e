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

每一步都是登錄的 op（`data.ops`）：`load_audio`、`frame_grid`、`interleave_text`、`turn_targets`、
`speech_codes`（`build_duplex_example` 依序套用這五步，`DUPLEX_EXAMPLE_OPS`）；訓練再接
`text_targets`、`tone_targets`、`pad_frames`、`log_mel`、`emotion_labels`（`DUPLEX_TRAIN_OPS`，
可由 `config.data.ops` 換掉），得到 `DUPLEX_BATCH` 綱要的欄位。
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import FRAME_SAMPLES, HOP_LENGTH, SAMPLE_RATE
from speakllm_jax.audio.features import log_mel_np
from speakllm_jax.audio.io import load_audio as read_audio
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
from speakllm_jax.data.ops import SkipExample, apply_ops, compose, register_op
from speakllm_jax.data.overlap import OverlapConfig, overlap_aware_targets
from speakllm_jax.data.schema import BatchSchema, Field
from speakllm_jax.data.transforms import mel_pad_value
from speakllm_jax.labels import EMOTIONS, emotion_token
from speakllm_jax.text.normalize import normalize_zh

NUM_CODEBOOKS = 4
SAMPLES_PER_FRAME = FRAME_SAMPLES  # 640
# 每個 25 Hz 幀對應的梅爾框數（100 Hz）。
MEL_PER_FRAME = SAMPLES_PER_FRAME // HOP_LENGTH  # 4


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
    path = row.get("audio")
    if not path:
        raise ValueError(f"{row.get('id', '?')}: 清單列缺少欄位 'audio'")
    wave = read_audio(
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
    return normalize_zh(text, normalize)


# 全雙工訓練批次的綱要（唯一的一份）：任務、規劃器與逐列處理都依它。
# 維度：frames = data.max_frames（25 Hz）、mel_frames = 4 × frames、n_mels、
# chars = model.max_chars_per_token、codebooks = 每幀語音碼層數。
DUPLEX_BATCH = BatchSchema(
    [
        Field("mel", ("n_mels", "mel_frames"), "float32"),
        Field("mel_mask", ("mel_frames",), "bool", pad=False),
        Field("frame_mask", ("frames",), "bool", pad=False),
        Field("text_target", ("frames",), "int32", pad="pad_id"),
        Field("text_is_token", ("frames",), "bool", pad=False),
        Field("tones_target", ("frames", "chars"), "int32"),
        Field("codes_target", ("frames", "codebooks"), "int32"),
        Field("code_weight", ("frames",), "float32"),
        Field("turn_target", ("frames",), "int32"),
        Field("turn_weight", ("frames",), "float32"),
        Field("emotion", (), "int32"),
        Field("emotion_token", (), "int32"),
    ]
)

# 由一列對話到 `DuplexExample` 的步驟，與訓練時再加上的步驟（`config.data.ops` 空白時的預設）。
DUPLEX_EXAMPLE_OPS = "load_audio|frame_grid|interleave_text|turn_targets|speech_codes"
DUPLEX_TRAIN_OPS = (
    DUPLEX_EXAMPLE_OPS + "|text_targets|tone_targets|pad_frames|log_mel|emotion_labels"
)


@dataclass
class DuplexContext:
    """各 op 共用的物件與設定；op 規格裡的 `k=v` 會蓋過對應的設定值。"""

    tokenizer: Any
    config: DuplexConfig = field(default_factory=DuplexConfig)
    pad_id: int | None = None  # 缺省為分詞器的 eos
    codes: Mapping[str, np.ndarray] = field(default_factory=dict)  # 列 id → [Q, M]
    max_frames: int = 0
    n_mels: int = 80

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = int(self.tokenizer.eos_id)

    def duplex_config(self, **overrides: Any) -> DuplexConfig:
        return dataclasses.replace(self.config, **overrides) if overrides else self.config


def duplex_batch_sizes(frames: int, n_mels: int, chars: int, codebooks: int) -> dict[str, int]:
    """`DUPLEX_BATCH` 的具名維度 → 大小。"""
    return {
        "frames": int(frames),
        "mel_frames": MEL_PER_FRAME * int(frames),
        "n_mels": int(n_mels),
        "chars": int(chars),
        "codebooks": int(codebooks),
    }


@register_op("load_audio")
def load_audio_op(ctx: DuplexContext, **overrides: Any):
    """讀雙聲道對話音訊（聲道依 `channel_roles` 排成使用者、助理）→ `wave [2, S]`。

    已有 `ex["wave"]` 時直接用；清單列缺 `turns`／`overlaps` 時拋出 ValueError。
    """
    sr = ctx.duplex_config(**overrides).sample_rate

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        row = ex["row"]
        rid = str(row.get("id", "?"))
        for k in ("turns", "overlaps"):
            if k not in row:
                raise ValueError(f"{rid}: 清單列缺少欄位 {k!r}")
        wave = ex.get("wave")
        if wave is None:
            wave = _load_stereo(row, sr)
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 2 or wave.shape[0] != 2:
            raise ValueError(f"{rid}: wave 形狀應為 [2, samples]，得到 {wave.shape}")
        return {**ex, "id": rid, "wave": wave, "sample_rate": sr}

    return op


@register_op("frame_grid")
def frame_grid_op(ctx: DuplexContext):
    """放上 25 Hz 幀格：`num_frames` = ceil(取樣數 / 640)，兩聲道補零成 `user_audio`／`assistant_audio`；
    `turns` 依起點排序。"""

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        sr = ex["sample_rate"]
        wave = ex["wave"]
        hop = int(round(sr * FRAME_SECONDS))
        n = num_frames_for(wave.shape[1], sr)
        padded = np.zeros((2, n * hop), dtype=np.float32)
        padded[:, : wave.shape[1]] = wave
        turns = sorted(ex["row"]["turns"], key=lambda t: (float(t["start"]), str(t["speaker"])))
        out = {k: v for k, v in ex.items() if k != "wave"}
        out.update(num_frames=n, user_audio=padded[0], assistant_audio=padded[1], turns=turns)
        return out

    return op


@register_op("interleave_text")
def interleave_text_op(ctx: DuplexContext, **overrides: Any):
    """助理文字放上幀格（聲調感知對齊、提早 `lead_frames` 幀）→ `text_ids`、`text_mask`、
    `text_tones`、`token_frames`（領先後）、`token_frames_no_lead`、`assistant_turns`。

    參數可蓋過 `lead_frames`、`tone_aware`、`normalize`、`max_chars_per_token`。
    """
    cfg = ctx.duplex_config(**overrides)
    tokenizer, pad = ctx.tokenizer, int(ctx.pad_id)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        n, turns = ex["num_frames"], ex["turns"]
        a_turns = [
            t for t in turns if t.get("speaker") == "assistant" and t.get("kind") != "backchannel"
        ]
        encs = [
            encode_for_alignment(
                tokenizer,
                _prepare_text(str(t.get("text", "")), cfg.normalize),
                cfg.max_chars_per_token,
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
        return {
            **ex,
            "text_ids": grid.text_ids,
            "text_mask": grid.text_mask,
            "text_tones": grid.tones,
            "token_frames": frames_lead,
            "token_frames_no_lead": frames_no_lead,
            "assistant_turns": np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        }

    return op


@register_op("turn_targets")
def turn_targets_op(ctx: DuplexContext, **overrides: Any):
    """輪替目標與權重（`overlap_aware_targets`）→ `turn_target`、`turn_weight`、`speech_weight`、
    `barge_in_frames`、`user_turns`；搶話後語音權重為 0 的幀 `text_mask` 設為 False。

    參數可蓋過 `OverlapConfig` 的欄位（`reaction_frames`、`barge_in_weight`、…、`ablation`）。
    """
    ocfg = dataclasses.replace(ctx.config.overlap, **overrides)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        n, turns = ex["num_frames"], ex["turns"]
        ft = overlap_aware_targets(turns, ex["row"]["overlaps"], n, ocfg)
        out = dict(ex)
        if "text_mask" in ex:
            # 搶話後被遮掉語音的幀，文字計畫也不再當作目標（助理應該已經停下）
            text_mask = ex["text_mask"].copy()
            if not ocfg.ablation:
                text_mask &= ft.speech_weight > 0
            out["text_mask"] = text_mask
        user = [
            _frame_span(t, n)
            for t in turns
            if t.get("speaker") == "user" and t.get("kind") != "backchannel"
        ]
        out.update(
            turn_target=ft.turn_targets,
            turn_weight=ft.turn_weight,
            speech_weight=ft.speech_weight,
            barge_in_frames=ft.barge_in_frames,
            user_turns=np.asarray(user, dtype=np.int64).reshape(-1, 2),
        )
        return out

    return op


_NO_CODES = object()


@register_op("speech_codes")
def speech_codes_op(ctx: DuplexContext, **overrides: Any):
    """助理聲道的語音碼 → `codes_target [N, Q]` 與 `code_weight = speech_weight · 有碼`。

    碼取自 `ex["raw_codes"]`（可為 None），否則依列 id 查 `ctx.codes`；M 與 N 最多差
    `code_tolerance_frames` 幀，不足補 0 且權重為 0。
    """
    cfg = ctx.duplex_config(**overrides)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        n, rid = ex["num_frames"], ex["id"]
        raw = ex.get("raw_codes", _NO_CODES)
        if raw is _NO_CODES:
            raw = ctx.codes.get(ex["row"]["id"])
        q = int(cfg.num_codebooks)
        code_arr = np.zeros((q, n), dtype=np.int32)
        has_code = np.zeros(n, dtype=np.float32)
        if raw is not None:
            c = np.asarray(raw)
            if c.ndim != 2 or c.shape[0] != q:
                raise ValueError(f"{rid}: codes 形狀應為 [{q}, N]，得到 {c.shape}")
            if abs(c.shape[1] - n) > cfg.code_tolerance_frames:
                raise ValueError(f"{rid}: codes 有 {c.shape[1]} 幀，音訊為 {n} 幀")
            m = min(c.shape[1], n)
            code_arr[:, :m] = c[:, :m]
            has_code[:m] = 1.0
        speech_w = ex.get("speech_weight", np.ones(n, np.float32))
        return {
            **ex,
            "codes_target": np.ascontiguousarray(code_arr.T),
            "code_weight": speech_w * has_code,
        }

    return op


@register_op("text_targets")
def text_targets_op(ctx: DuplexContext):
    """文字目標：有文字的幀為符號，其餘為填充符號 → `text_target`、`text_is_token`。"""
    pad = int(ctx.pad_id)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        mask = ex["text_mask"]
        text_t = np.where(mask, ex["text_ids"], pad).astype(np.int32)
        return {**ex, "text_target": text_t, "text_is_token": mask.astype(bool)}

    return op


@register_op("tone_targets")
def tone_targets_op(ctx: DuplexContext):
    """聲調目標：有文字的幀為該符號各字的聲調，其餘為 0 → `tones_target [N, K]`。"""
    k = int(ctx.config.max_chars_per_token)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        tones = np.where(ex["text_mask"][:, None], ex["text_tones"], 0).astype(np.int32)
        return {**ex, "tones_target": tones.reshape(ex["num_frames"], k)}

    return op


@register_op("pad_frames")
def pad_frames_op(ctx: DuplexContext, max_frames: int | None = None):
    """把綱要中以 frames 為第一維的欄位補齊到 `max_frames`（缺省 `data.max_frames`）並加上
    `frame_mask`；超過時以 too_long 略過。補齊值見 `DUPLEX_BATCH`。"""
    m = int(max_frames if max_frames is not None else ctx.max_frames)
    if m <= 0:
        raise ValueError("pad_frames 需要 max_frames > 0（data.max_frames）")
    values = {"pad_id": int(ctx.pad_id)}
    framed = [f for f in DUPLEX_BATCH if f.dims[:1] == ("frames",) and f.name != "frame_mask"]

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        n = ex["num_frames"]
        if n > m:
            raise SkipExample("too_long", f"{n} 幀超過 max_frames={m}")
        out = dict(ex)
        for f in framed:
            if f.name in ex:
                x = np.asarray(ex[f.name])
                padded = np.full((m,) + x.shape[1:], f.pad_value(values), x.dtype)
                padded[:n] = x
                out[f.name] = padded
        out["frame_mask"] = np.arange(m) < n
        out["padded_frames"] = m
        return out

    return op


@register_op("log_mel")
def log_mel_op(ctx: DuplexContext, n_mels: int | None = None):
    """使用者聲道的對數梅爾 `mel [n_mels, 4N]` 與 `mel_mask`；`pad_frames` 之後則補齊到 4·max_frames
    （補齊值 `transforms.mel_pad_value`）。"""
    nm = int(n_mels if n_mels is not None else ctx.n_mels)

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        n = ex["num_frames"]
        mel = log_mel_np(ex["user_audio"], n_mels=nm, pad_to_seconds=None)[:, : MEL_PER_FRAME * n]
        width = MEL_PER_FRAME * int(ex.get("padded_frames", n))
        full = np.full((nm, width), mel_pad_value(mel), np.float32)
        full[:, : mel.shape[1]] = mel
        return {**ex, "mel": full, "mel_mask": np.arange(width) < mel.shape[1]}

    return op


@register_op("emotion_labels")
def emotion_labels_op(ctx: DuplexContext):
    """情緒頭的目標（使用者的 `emotion`）與條件符號（助理的 `response_style`，缺省沿用 emotion）
    → `emotion`、`emotion_token`；未知的標籤以 bad_emotion 略過。"""
    token_ids = [int(ctx.tokenizer.special_id(emotion_token(e))) for e in EMOTIONS]

    def op(ex: dict[str, Any]) -> dict[str, Any]:
        row = ex["row"]
        emotion = str(row.get("emotion") or "neutral")
        style = str(row.get("response_style") or emotion)
        if emotion not in EMOTIONS or style not in EMOTIONS:
            raise SkipExample(
                "bad_emotion",
                f"未知的情緒標籤 {emotion!r}／{style!r}（可用：{EMOTIONS}）",
                report=True,
            )
        return {
            **ex,
            "emotion": np.int32(EMOTIONS.index(emotion)),
            "emotion_token": np.int32(token_ids[EMOTIONS.index(style)]),
        }

    return op


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
    依序套用 `DUPLEX_EXAMPLE_OPS`。
    """
    ctx = DuplexContext(tokenizer, config or DuplexConfig(), pad_id=pad_id)
    ex: dict[str, Any] = {"row": row, "raw_codes": codes}
    if wave is not None:
        ex["wave"] = wave
    ex = apply_ops(compose(DUPLEX_EXAMPLE_OPS, ctx), ex)
    return DuplexExample(
        id=ex["id"],
        num_frames=ex["num_frames"],
        user_audio=ex["user_audio"],
        assistant_audio=ex["assistant_audio"],
        text_ids=ex["text_ids"],
        text_mask=ex["text_mask"],
        text_tones=ex["text_tones"],
        token_frames=ex["token_frames"],
        token_frames_no_lead=ex["token_frames_no_lead"],
        turn_targets=ex["turn_target"],
        turn_weight=ex["turn_weight"],
        speech_weight=ex["speech_weight"],
        codes=ex["codes_target"].T,
        code_weight=ex["code_weight"],
        user_turns=ex["user_turns"],
        assistant_turns=ex["assistant_turns"],
        barge_in_frames=ex["barge_in_frames"],
    )
