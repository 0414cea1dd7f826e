"""音訊讀寫：soundfile 讀檔、soxr 重取樣、壞檔判定與批次略過計數。

所有讀檔錯誤都以 `AudioError` 拋出，`reason` 為固定的原因代碼之一（見 `REASONS`），
`path` 為出錯的檔案；批次工作以 `SkipCounter` 依原因計數並保留每一筆的明細。
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from speakllm_jax.audio.constants import SAMPLE_RATE

# 原因代碼：缺檔、空檔、格式損毀、資料被截斷、取樣率不符、削波、過長、過短、靜音。
REASONS = (
    "missing",
    "empty",
    "corrupt",
    "truncated",
    "wrong_rate",
    "clipped",
    "too_long",
    "too_short",
    "silent",
    "bad_channel",
)

CLIP_LEVEL = 0.999
DEFAULT_MAX_CLIP_FRACTION = 0.001
DEFAULT_SILENCE_RMS = 1e-4


class AudioError(ValueError):
    """音訊檔無法使用；`reason` 為 `REASONS` 之一，`path` 為檔案路徑，`detail` 為補充說明。"""

    def __init__(self, reason: str, path: str | os.PathLike | None, detail: str = "") -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.detail = detail
        msg = f"{self.path}: {reason}" if self.path else reason
        super().__init__(f"{msg}（{detail}）" if detail else msg)


def _wav_truncated(path: Path) -> str | None:
    """檢查 RIFF/WAVE 標頭宣告的 data 區塊長度是否超過實際檔案長度；是則回傳說明。"""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    have = size - pos - 8
                    if clen != 0xFFFFFFFF and clen > have:
                        return f"標頭宣告 data 區塊 {clen} 位元組，實際只有 {have}"
                    return None
                pos += 8 + clen + (clen & 1)
    except OSError:
        return None
    return None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioError("missing", path, "檔案不存在")
    if not path.is_file():
        raise AudioError("missing", path, "不是一般檔案")
    if path.stat().st_size == 0:
        raise AudioError("empty", path, "檔案大小為 0")


def audio_info(path: str | os.PathLike) -> dict[str, Any]:
    """讀取音訊標頭：回傳 sample_rate、channels、frames、duration（秒）、format、subtype。

    缺檔、空檔、無法解析或 WAV 資料被截斷時拋出 `AudioError`。
    """
    p = Path(path)
    _check_file(p)
    try:
        info = sf.info(str(p))
    except Exception as e:  # libsndfile 對壞檔拋出多種例外
        raise AudioError("corrupt", p, f"無法解析：{e}") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty", p, "沒有任何取樣")
    if info.format in ("WAV", "WAVEX", "RF64"):
        why = _wav_truncated(p)
        if why:
            raise AudioError("truncated", p, why)
    return {
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "frames": int(info.frames),
        "duration": float(info.frames) / float(info.samplerate),
        "format": info.format,
        "subtype": info.subtype,
    }


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """以 soxr（HQ）重取樣；`wave` 為 [samples] 或 [channels, samples]，回傳 float32。"""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    if wave.ndim == 1:
        return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32)
    out = soxr.resample(np.ascontiguousarray(wave.T), orig_sr, target_sr, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def load_audio(
    path: str | os.PathLike,
    target_sr: int | None = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    mono: bool = True,
    max_seconds: float | None = None,
    *,
    expected_sr: int | None = None,
    tolerance: float = 0.05,
) -> np.ndarray:
    """讀取音訊片段並重取樣到 `target_sr`（None 表示保留原取樣率），回傳 float32。

    `mono=True` 時回傳 [samples]（多聲道取平均）；`mono=False` 時一律回傳 [channels, samples]，
    雙聲道對話的兩個聲道因此保持分開。`offset`、`duration` 以秒計。
    `expected_sr` 給定時，檔案取樣率不同即拋出 reason 為 "wrong_rate" 的 `AudioError`；
    要求的片段超出檔尾超過 `tolerance` 秒時為 "too_short"；片段長於 `max_seconds` 時為 "too_long"。
    """
    p = Path(path)
    info = audio_info(p)
    sr = info["sample_rate"]
    if expected_sr is not None and sr != int(expected_sr):
        raise AudioError("wrong_rate", p, f"檔案為 {sr} Hz，預期 {expected_sr} Hz")
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioError("too_short", p, f"片段不合法：offset={offset} duration={duration}")
    total = info["duration"]
    if offset >= total:
        raise AudioError("too_short", p, f"offset {offset:.3f}s 超出檔長 {total:.3f}s")
    if duration is not None and offset + duration > total + tolerance:
        raise AudioError("too_short", p, f"片段結束 {offset + duration:.3f}s 超出檔長 {total:.3f}s")
    seg = (total - offset) if duration is None else min(duration, total - offset)
    if max_seconds is not None and seg > max_seconds:
        raise AudioError("too_long", p, f"{seg:.2f}s 超過上限 {max_seconds}s")
    start = int(round(offset * sr))
    frames = -1 if duration is None else max(1, int(round(seg * sr)))
    try:
        data, file_sr = sf.read(str(p), start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError("corrupt", p, f"讀取失敗：{e}") from e
    if data.shape[0] == 0:
        raise AudioError("empty", p, "讀到 0 個取樣")
    if not np.all(np.isfinite(data)):
        raise AudioError("corrupt", p, "含 NaN 或 Inf")
    wave = data.mean(axis=1) if mono else np.ascontiguousarray(data.T)
    if target_sr is not None:
        wave = resample(wave, file_sr, int(target_sr))
    return np.asarray(wave, dtype=np.float32)


def check_audio_detail(
    wave: np.ndarray,
    sr: int,
    *,
    expected_sr: int | None = None,
    min_seconds: float | None = None,
    max_seconds: float | None = None,
    clip_level: float = CLIP_LEVEL,
    max_clip_fraction: float = DEFAULT_MAX_CLIP_FRACTION,
    silence_rms: float | None = DEFAULT_SILENCE_RMS,
) -> tuple[str, str] | None:
    """檢查已讀入的波形；沒問題回傳 None，否則回傳 (原因代碼, 說明)。

    削波：|x| >= `clip_level` 的取樣比例超過 `max_clip_fraction`（任一聲道）。
    靜音：整段 RMS 低於 `silence_rms`。
    """
    wave = np.asarray(wave)
    if expected_sr is not None and int(sr) != int(expected_sr):
        return "wrong_rate", f"{sr} Hz，預期 {expected_sr} Hz"
    n = wave.shape[-1] if wave.ndim else 0
    if n == 0:
        return "empty", "沒有取樣"
    if not np.all(np.isfinite(wave)):
        return "corrupt", "含 NaN 或 Inf"
    dur = n / float(sr)
    if min_seconds is not None and dur < min_seconds:
        return "too_short", f"{dur:.3f}s 短於 {min_seconds}s"
    if max_seconds is not None and dur > max_seconds:
        return "too_long", f"{dur:.2f}s 超過 {max_seconds}s"
    frac = np.mean(np.abs(wave) >= clip_level, axis=-1)
    frac = float(np.max(frac))
    if frac > max_clip_fraction:
        return "clipped", f"{frac:.2%} 的取樣達到 ±{clip_level}"
    if silence_rms is not None:
        rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
        if rms < silence_rms:
            return "silent", f"RMS {rms:.2e} 低於 {silence_rms:.0e}"
    return None


def check_audio(wave: np.ndarray, sr: int, **kwargs: Any) -> str | None:
    """同 `check_audio_detail`，只回傳原因代碼（沒問題為 None）。"""
    res = check_audio_detail(wave, sr, **kwargs)
    return None if res is None else res[0]


def write_audio(
    path: str | os.PathLike, wave: np.ndarray, sr: int, subtype: str | None = None
) -> Path:
    """寫出音訊；格式依副檔名（wav、flac、mp3、ogg/opus）。

    `wave` 為 [samples] 或 [channels, samples]；超出 [-1, 1] 的值會被截到範圍內。
    WAV 預設寫 16 位元 PCM。先寫暫存檔再改名，中途失敗不留下半個檔案。
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    w = np.asarray(wave, dtype=np.float32)
    if w.ndim == 2:
        w = w.T  # soundfile 需要 [samples, channels]
    elif w.ndim != 1:
        raise ValueError(f"{p}: 波形維度必須為 1 或 2，收到 {w.shape}")
    w = np.clip(w, -1.0, 1.0)
    ext = p.suffix.lower()
    fmt = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG", ".opus": "OGG"}.get(ext)
    if fmt is None:
        raise ValueError(f"{p}: 不支援的副檔名 {ext!r}")
    if subtype is None:
        subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "MP3": "MPEG_LAYER_III"}.get(fmt)
        if ext == ".opus":
            subtype = "OPUS"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), w, int(sr), format=fmt, subtype=subtype)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


class SkipCounter:
    """略過紀錄（唯一的一種）：依原因計數；`keep_items` 時另保留每筆 (鍵, 原因, 說明)。

    批次工作（清單轉接、切段、語音碼抽取）保留明細寫成 `*.skipped.jsonl`；資料管線與訓練迭代器
    只計數（`keep_items=False`，長時間訓練不累積明細），計數可由批次的 `skipped` 欄位併入，
    並以 `as_dict()`／`load_counts()` 存入與恢復檢查點。
    """

    def __init__(self, counts: Mapping[str, int] | None = None, *, keep_items: bool = True) -> None:
        self.counts: Counter = Counter({k: int(v) for k, v in dict(counts or {}).items()})
        self.items: list[tuple[str, str, str]] = []
        self.keep_items = bool(keep_items)

    def add(self, key: Any, reason: str, detail: str = "") -> None:
        """記錄一筆略過；`key` 通常是列的 id 或檔案路徑（含行號）。"""
        self.counts[reason] += 1
        if self.keep_items:
            self.items.append((str(key), str(reason), str(detail)))

    def add_error(self, key: Any, err: AudioError) -> None:
        """記錄一個 `AudioError`。"""
        self.add(key, err.reason, err.detail or str(err))

    def update(self, other: SkipCounter | Mapping[str, Any]) -> SkipCounter:
        """併入另一個計數器、一個批次（讀它的 `skipped` 欄位）或 {原因: 數量}；回傳自己。"""
        if isinstance(other, SkipCounter):
            self.counts.update(other.counts)
            if self.keep_items:
                self.items.extend(other.items)
        elif isinstance(other, Mapping) and "skipped" in other:
            self.counts.update({k: int(v) for k, v in dict(other["skipped"]).items()})
        elif isinstance(other, Mapping):
            self.counts.update({k: int(v) for k, v in other.items()})
        else:
            raise TypeError(f"無法併入略過計數：{type(other).__name__}")
        return self

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def as_dict(self) -> dict[str, int]:
        """{原因: 數量}（依原因排序，不含 0）。"""
        return {k: int(v) for k, v in sorted(self.counts.items()) if v}

    def load_counts(self, counts: Mapping[str, int]) -> None:
        """以 `counts` 取代目前的計數（檢查點恢復用；明細清空）。"""
        self.counts = Counter({k: int(v) for k, v in dict(counts).items()})
        self.items = []

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"

    def __len__(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, Any]:
        """回傳 {"total": 總數, "by_reason": {原因: 數量}}。"""
        return {"total": len(self), "by_reason": dict(sorted(self.counts.items()))}

    def table(self) -> str:
        """人看的摘要表。"""
        lines = [f"略過 {len(self)} 筆"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason:<20} {n}")
        return "\n".join(lines)

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """每筆略過寫成一行 JSON：{"key", "reason", "detail"}。"""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", encoding="utf-8") as f:
            for key, reason, detail in self.items:
                f.write(
                    json.dumps({"key": key, "reason": reason, "detail": detail}, ensure_ascii=False)
                    + "\n"
                )
        return p
