"""webrtcvad 語音活動偵測與在靜音處切分長音檔。

流程：波形重取樣到 16 kHz、轉 16 位元 PCM，以 30 ms 一幀交給 webrtcvad 判定；
再做離線的延滯（hangover）平滑：短於 `hangover_ms` 的靜音視為語音的一部分（不切斷），
短於 `min_speech_ms` 的語音島視為雜訊丟掉。邊界落在實際轉換的那一幀，因此不因延滯而偏移。
webrtcvad 自身的判定在語音結束後還會延續約 100 ms，因此最後以 10 ms 能量把每段的起訖
向內修正（至多 `refine_ms`）：能量低於「底噪的 4 倍與段內峰值 1%」兩者較大值的邊緣幀會被剃除。
`split_utterances` 把語音段落依序併成不超過 `max_seconds` 的片段，切點只落在靜音中。
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webrtcvad

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.io import AudioError, SkipCounter, check_audio_detail, load_audio, resample
from speakllm_jax.audio.io import write_audio as _write
from speakllm_jax.cli import UserValueError
from speakllm_jax.data.manifest import (
    iter_manifest,
    resolve_audio,
    resolve_path,
    validate_row,
    write_manifest,
)
from speakllm_jax.text.codeswitch import language_of
from speakllm_jax.text.normalize import fix_spaces

VAD_RATES = (8000, 16000, 32000, 48000)


@dataclass(frozen=True)
class VadConfig:
    """VAD 參數：`aggressiveness` 0–3（越大越容易判為非語音）；時間皆以毫秒計。"""

    aggressiveness: int = 2
    frame_ms: int = 30
    hangover_ms: int = 300
    min_speech_ms: int = 150
    pad_ms: int = 100
    refine_ms: int = 240

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise UserValueError(f"aggressiveness 必須為 0–3，收到 {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms 必須為 10、20 或 30，收到 {self.frame_ms}")


def frame_flags(wave: np.ndarray, sr: int, cfg: VadConfig = VadConfig()) -> np.ndarray:
    """逐幀的 webrtcvad 判定（bool 陣列，一幀 `cfg.frame_ms` 毫秒）；多聲道取聯集。"""
    w = np.asarray(wave, dtype=np.float32)
    chans = w[None] if w.ndim == 1 else w
    flags = None
    for ch in chans:
        f = _flags_mono(ch, sr, cfg)
        flags = f if flags is None else (flags | f)
    return flags if flags is not None else np.zeros(0, bool)


def _flags_mono(wave: np.ndarray, sr: int, cfg: VadConfig) -> np.ndarray:
    rate = sr if sr in VAD_RATES else SAMPLE_RATE
    if rate != sr:
        wave = resample(wave, sr, rate)
    pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")
    n = rate * cfg.frame_ms // 1000
    nframes = len(pcm) // n
    vad = webrtcvad.Vad(cfg.aggressiveness)
    buf = pcm[: nframes * n].tobytes()
    step = 2 * n
    return np.array(
        [vad.is_speech(buf[i * step : (i + 1) * step], rate) for i in range(nframes)], dtype=bool
    )


def _runs(flags: np.ndarray, value: bool) -> list[tuple[int, int]]:
    """回傳值為 `value` 的連續區段 [start, end)（以幀計）。"""
    x = np.concatenate([[False], flags == value, [False]]).astype(np.int8)
    d = np.diff(x)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def smooth_flags(flags: np.ndarray, cfg: VadConfig = VadConfig()) -> np.ndarray:
    """延滯平滑：填平短於 hangover 的內部靜音，丟掉短於 min_speech 的語音島。"""
    f = np.asarray(flags, dtype=bool).copy()
    hang = max(1, round(cfg.hangover_ms / cfg.frame_ms))
    for s, e in _runs(f, False):
        if s > 0 and e < len(f) and e - s < hang:
            f[s:e] = True
    min_sp = max(1, round(cfg.min_speech_ms / cfg.frame_ms))
    for s, e in _runs(f, True):
        if e - s < min_sp:
            f[s:e] = False
    return f


def speech_segments(
    wave: np.ndarray, sr: int, cfg: VadConfig = VadConfig()
) -> list[tuple[float, float]]:
    """偵測語音段落，回傳 [(起, 訖)]（秒，不含 padding）。"""
    flags = smooth_flags(frame_flags(wave, sr, cfg), cfg)
    sec = cfg.frame_ms / 1000.0
    segs = [(s * sec, e * sec) for s, e in _runs(flags, True)]
    if cfg.refine_ms > 0 and segs:
        segs = _refine(np.asarray(wave, dtype=np.float32), sr, segs, cfg.refine_ms / 1000.0)
        segs = [(s, e) for s, e in segs if e - s >= cfg.min_speech_ms / 1000.0 - 1e-9]
    return [(round(s, 3), round(e, 3)) for s, e in segs]


def _refine(
    wave: np.ndarray, sr: int, segs: list[tuple[float, float]], limit: float
) -> list[tuple[float, float]]:
    """以 10 ms 能量把段落邊緣的低能量幀剃除（每側至多 `limit` 秒）。"""
    mono = wave if wave.ndim == 1 else np.max(np.abs(wave), axis=0)
    hop = max(1, sr // 100)
    n = len(mono) // hop
    if n == 0:
        return segs
    rms = np.sqrt(np.mean(np.square(mono[: n * hop].reshape(n, hop), dtype=np.float64), axis=1))
    floor = float(np.percentile(rms, 10))
    out = []
    for s, e in segs:
        a, b = int(s * 100), min(n, int(np.ceil(e * 100)))
        if b <= a:
            out.append((s, e))
            continue
        thr = max(4.0 * floor, 0.01 * float(rms[a:b].max()))
        k = int(limit * 100)
        while b - a > 1 and k > 0 and rms[b - 1] < thr:
            b -= 1
            k -= 1
        k = int(limit * 100)
        while b - a > 1 and k > 0 and rms[a] < thr:
            a += 1
            k -= 1
        out.append((a / 100.0, b / 100.0))
    return out


def split_utterances(
    segments: list[tuple[float, float]], total: float, max_seconds: float, pad: float = 0.1
) -> list[tuple[float, float]]:
    """把語音段落併成不超過 `max_seconds` 的片段，切點只落在靜音中（兩側各留至多 `pad` 秒）。

    單一語音段本身超過上限時（中間沒有夠長的靜音），只能等分硬切。
    """
    if max_seconds <= 0:
        raise UserValueError(f"max_seconds 必須 > 0，收到 {max_seconds}")
    limit = max(max_seconds - 2 * pad, max_seconds / 2)
    segs: list[tuple[float, float]] = []
    for s, e in segments:
        n = int(np.ceil((e - s) / limit - 1e-9)) if e - s > limit else 1
        step = (e - s) / n
        segs += [(s + k * step, s + (k + 1) * step) for k in range(n)]
    groups: list[list[tuple[float, float]]] = []
    for seg in segs:
        if groups and seg[1] - groups[-1][0][0] <= limit:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    out = []
    for i, g in enumerate(groups):
        start, end = g[0][0], g[-1][1]
        lo = 0.0 if i == 0 else (groups[i - 1][-1][1] + start) / 2
        hi = total if i == len(groups) - 1 else (end + groups[i + 1][0][0]) / 2
        out.append((round(max(lo, start - pad), 3), round(min(hi, end + pad), 3)))
    return out


# ---------------------------------------------------------------- 清單層級的重取樣與切分


def _piece_row(
    row: dict[str, Any],
    pid: str,
    rel_audio: str,
    n: int,
    sr: int,
    channels: int,
    start: float,
    end: float,
) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("turns", "overlaps")}
    src_off = float(row.get("offset", 0.0))
    out.update(
        id=pid,
        audio=rel_audio,
        offset=0.0,
        duration=round(n / sr, 4),
        sample_rate=sr,
        channels=channels,
        source_id=row["id"],
        source_audio=row["audio"],
        source_start=round(src_off + start, 4),
        source_end=round(src_off + end, 4),
    )
    for key in ("turns", "overlaps"):
        items = []
        for it in row.get(key) or []:
            mid = (it["start"] + it["end"]) / 2
            if start <= mid < end:
                moved = dict(it)
                moved["start"] = round(max(0.0, it["start"] - start), 4)
                moved["end"] = round(min(end - start, it["end"] - start), 4)
                if "onset" in moved:
                    moved["onset"] = round(max(0.0, it["onset"] - start), 4)
                items.append(moved)
        if row.get(key) is not None:
            out[key] = items
    return out


def split_row(
    row: dict[str, Any],
    src_dir: str | Path | None,
    skips: Any,
    target_sr: int = SAMPLE_RATE,
    vad: bool = True,
    max_seconds: float = 30.0,
    cfg: VadConfig = VadConfig(),
    min_seconds: float = 0.2,
    check_options: dict[str, Any] | None = None,
    key: str = "",
) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray | None]]:
    """一列的驗證、重取樣與 VAD 切分：回傳 [(新列, 片段波形, 回應音訊或 None)]。

    新列的 `audio` 尚未填（由呼叫端寫檔或寫入分片後決定）；壞列、壞檔依原因記入 `skips`，
    回傳空串列，不拋例外；`key` 為列沒有 id 時的略過鍵。規則見 `resample_split`。
    """
    rid = str(row.get("id", key))
    probs = validate_row(row)
    if probs:
        skips.add(rid, getattr(probs[0], "reason", "invalid"), "; ".join(probs))
        return []
    multi = row["channels"] > 1
    try:
        wave = load_audio(
            resolve_audio(row, src_dir),
            target_sr=target_sr,
            offset=row["offset"],
            duration=row["duration"],
            mono=not multi,
            expected_sr=row["sample_rate"],
        )
    except AudioError as e:
        skips.add_error(rid, e)
        return []
    bad = check_audio_detail(wave, target_sr, min_seconds=min_seconds, **dict(check_options or {}))
    if bad:
        skips.add(rid, bad[0], bad[1])
        return []
    total = wave.shape[-1] / target_sr
    if multi or not vad:
        if not multi and total > max_seconds:
            skips.add(rid, "too_long", f"{total:.2f}s 超過 {max_seconds}s（未開 VAD）")
            return []
        pieces = [(0.0, total)]
    else:
        segs = speech_segments(wave, target_sr, cfg)
        if not segs:
            skips.add(rid, "silent", "VAD 沒有偵測到語音")
            return []
        pad = cfg.pad_ms / 1000.0
        if total <= max_seconds:
            pieces = [(max(0.0, segs[0][0] - pad), min(total, segs[-1][1] + pad))]
        else:
            if not row.get("turns"):
                skips.add(
                    rid, "too_long", f"{total:.2f}s 超過 {max_seconds}s 且沒有 turns 可對齊文字"
                )
                return []
            pieces = split_utterances(segs, total, max_seconds, pad)
    out = []
    for k, (s, e) in enumerate(pieces):
        pid = rid if len(pieces) == 1 else f"{rid}_{k:03d}"
        a, b = int(round(s * target_sr)), int(round(e * target_sr))
        piece = wave[..., a:b]
        new = _piece_row(
            row, pid, "", piece.shape[-1], target_sr, wave.shape[0] if multi else 1, s, e
        )
        if len(pieces) > 1:
            texts = [t["text"] for t in new.get("turns", []) if t.get("text")]
            if not texts:
                skips.add(pid, "no_text", "片段內沒有任何 turn 文字")
                continue
            new["text"] = fix_spaces(" ".join(texts))
            new["language"] = language_of(new["text"])
        resp = None
        if row.get("response_audio"):
            try:
                resp = load_audio(resolve_path(row["response_audio"], src_dir), target_sr)
            except AudioError as err:
                skips.add_error(pid, err)
                continue
        out.append((new, piece, resp))
    return out


def resample_split(
    manifest: str | Path,
    output_dir: str | Path,
    target_sr: int = SAMPLE_RATE,
    vad: bool = True,
    max_seconds: float = 30.0,
    cfg: VadConfig = VadConfig(),
    output_manifest: str | Path | None = None,
    min_seconds: float = 0.2,
    check_options: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """重取樣整份清單並以 VAD 切成不超過 `max_seconds` 的片段，寫出新清單與略過報告。

    單聲道列：VAD 後去掉頭尾靜音；超過上限時在靜音處切開，片段的文字由落在其中的 turns 組成，
    沒有 turns（無法對齊文字）的過長列以 "too_long" 略過。多聲道（對話）列不切分，
    只重取樣並保留所有聲道。每個輸出列帶 source_id、source_start、source_end（原檔時間，秒）。
    壞檔與壞列依原因計數，寫入 `*.skipped.jsonl`，不會中斷。逐列的規則在 `split_row`。
    """
    src = Path(manifest)
    out_dir = Path(output_dir)
    out_manifest = Path(output_manifest) if output_manifest else out_dir / "manifest.jsonl"
    base = out_manifest.parent
    skips = SkipCounter()
    rows_out: list[dict[str, Any]] = []
    n_in = 0
    for row in iter_manifest(src, skips):
        n_in += 1
        pieces = split_row(
            row,
            src.parent,
            skips,
            target_sr,
            vad,
            max_seconds,
            cfg,
            min_seconds,
            check_options,
            key=f"{src}:{n_in}",
        )
        for new, piece, resp in pieces:
            folder = out_dir / "audio" / str(new["corpus"])
            path = _write(folder / f"{new['id']}.wav", piece, target_sr)
            new["audio"] = os.path.relpath(path, base)
            if resp is not None:
                rp = _write(folder / f"{new['id']}_response.wav", resp, target_sr)
                new["response_audio"] = os.path.relpath(rp, base)
            rows_out.append(new)
    n = write_manifest(out_manifest, rows_out)
    skipped = out_manifest.with_name(out_manifest.stem + ".skipped.jsonl")
    skips.write_jsonl(skipped)
    summary = {
        "input_rows": n_in,
        "output_rows": n,
        "output": str(out_manifest),
        "skipped": skips.report(),
        "skipped_file": str(skipped),
    }
    log(f"讀入 {n_in} 列，寫出 {n} 列到 {out_manifest}")
    log(skips.table())
    return summary
