"""清單（manifest）JSONL 格式：一行一個 JSON 物件，一列描述一段音訊。

必要欄位（`REQUIRED_FIELDS`）：
    id           唯一字串
    audio        音訊路徑；相對路徑以清單檔所在資料夾為基準
    offset       片段起點（秒，>= 0）
    duration     片段長度（秒，> 0）
    sample_rate  檔案取樣率（Hz）
    channels     聲道數（雙聲道對話為 2：聲道 0 使用者、聲道 1 助理）
    text         轉寫文字；有 turns 時可為空字串
    language     "zh"、"en" 或 "mixed"
    speaker      說話人代號
    corpus       語料名稱
    split        train／dev／test 等

選用欄位：text_raw、emotion（說話人的情緒）、response_style（助理回應的情緒／風格標籤）、task、instruction、response_text、response_audio、
channel_roles（例如 ["user", "assistant"]）、turns（[{speaker, start, end, text, kind}]）、
overlaps（[{start, end, kind: "backchannel"|"barge_in", by, onset}]）、pauses（使用者句中停頓的
靜音區間 [{start, end, kind: "filler"|"comma", text}]），以及 source_* 來源欄位
（例如 source_id、source_start、source_end）。
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from speakllm_jax.audio.io import AudioError, SkipCounter, audio_info
from speakllm_jax.cli import UserFileError, empty_manifest

log = logging.getLogger(__name__)

REQUIRED_FIELDS = (
    "id",
    "audio",
    "offset",
    "duration",
    "sample_rate",
    "channels",
    "text",
    "language",
    "speaker",
    "corpus",
    "split",
)
OPTIONAL_FIELDS = (
    "text_raw",
    "emotion",
    "response_style",
    "task",
    "instruction",
    "response_text",
    "response_audio",
    "channel_roles",
    "turns",
    "overlaps",
    "pauses",
)
LANGUAGES = ("zh", "en", "mixed")
OVERLAP_KINDS = ("backchannel", "barge_in")
TIME_TOLERANCE = 0.05  # 秒：時間戳記超出片段長度的容許誤差


class Problem(str):
    """一條驗證問題：字串本身為「欄位: 說明」，另帶 `field` 與 `reason`（原因代碼）。"""

    field: str
    reason: str

    def __new__(cls, field: str, reason: str, message: str) -> Problem:
        obj = super().__new__(cls, f"{field}: {message}")
        obj.field = field
        obj.reason = reason
        return obj


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def resolve_path(path: str | os.PathLike, manifest_dir: str | os.PathLike | None) -> Path:
    """相對路徑以 `manifest_dir` 為基準解析；絕對路徑原樣回傳。"""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or manifest_dir is None:
        return p
    return Path(manifest_dir) / p


def resolve_audio(row: dict[str, Any], manifest_dir: str | os.PathLike | None) -> Path:
    """回傳列的音訊檔路徑（相對路徑相對於清單檔所在資料夾）。"""
    if not isinstance(row.get("audio"), str) or not row["audio"]:
        raise ValueError(f"列 {row.get('id')!r}: audio 欄位缺少或不是字串")
    return resolve_path(row["audio"], manifest_dir)


def _check_times(
    items: Any, name: str, duration: float | None, need: tuple[str, ...]
) -> list[Problem]:
    out: list[Problem] = []
    if not isinstance(items, list):
        return [Problem(name, "bad_field", "必須是清單")]
    for i, it in enumerate(items):
        f = f"{name}[{i}]"
        if not isinstance(it, dict):
            out.append(Problem(f, "bad_field", "必須是物件"))
            continue
        for k in need:
            if k not in it:
                out.append(Problem(f"{f}.{k}", "missing_field", "缺少"))
        s, e = it.get("start"), it.get("end")
        if not (_is_number(s) and _is_number(e)):
            out.append(Problem(f, "bad_field", "start/end 必須是數字"))
            continue
        if s < 0 or e < s:
            out.append(Problem(f, "bad_field", f"時間不合法 start={s} end={e}"))
        if duration is not None and e > duration + TIME_TOLERANCE:
            out.append(Problem(f, "bad_field", f"end={e} 超出片段長度 {duration}"))
    return out


def validate_row(
    row: Any, base_dir: str | os.PathLike | None = None, check_audio: bool = False
) -> list[str]:
    """驗證一列；回傳問題清單（空清單表示合格），每條以欄位名開頭，並為 `Problem`。

    `check_audio=True` 時另外讀取音訊標頭：檔案缺少或損毀、取樣率或聲道數與宣告不符、
    片段超出檔尾都會列為問題（reason 分別為 missing／corrupt／wrong_rate／…）。
    """
    if not isinstance(row, dict):
        return [Problem("row", "bad_json", "不是 JSON 物件")]
    probs: list[Problem] = []
    for k in REQUIRED_FIELDS:
        if k not in row or row[k] is None:
            probs.append(Problem(k, "missing_field", "缺少必要欄位"))
    for k in ("id", "audio", "speaker", "corpus", "split"):
        v = row.get(k)
        if k in row and v is not None and (not isinstance(v, str) or not v.strip()):
            probs.append(Problem(k, "bad_field", f"必須是非空字串，收到 {v!r}"))
    off, dur = row.get("offset"), row.get("duration")
    if "offset" in row and off is not None and (not _is_number(off) or off < 0):
        probs.append(Problem("offset", "bad_field", f"必須是 >= 0 的數字，收到 {off!r}"))
    if "duration" in row and dur is not None and (not _is_number(dur) or dur <= 0):
        probs.append(Problem("duration", "bad_field", f"必須是 > 0 的數字，收到 {dur!r}"))
    for k in ("sample_rate", "channels"):
        v = row.get(k)
        if k in row and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            probs.append(Problem(k, "bad_field", f"必須是正整數，收到 {v!r}"))
    text = row.get("text")
    if "text" in row and text is not None:
        if not isinstance(text, str):
            probs.append(Problem("text", "bad_field", "必須是字串"))
        elif not text.strip() and not row.get("turns"):
            probs.append(Problem("text", "empty_text", "空白（且沒有 turns）"))
    lang = row.get("language")
    if "language" in row and lang is not None and lang not in LANGUAGES:
        probs.append(Problem("language", "bad_field", f"必須是 {LANGUAGES} 之一，收到 {lang!r}"))
    d = dur if _is_number(dur) else None
    if row.get("turns") is not None:
        probs += _check_times(row["turns"], "turns", d, ("speaker", "start", "end", "text"))
    if row.get("pauses") is not None:
        probs += _check_times(row["pauses"], "pauses", d, ("start", "end"))
    if row.get("overlaps") is not None:
        probs += _check_times(row["overlaps"], "overlaps", d, ("start", "end", "kind"))
        if isinstance(row["overlaps"], list):
            for i, ov in enumerate(row["overlaps"]):
                if isinstance(ov, dict) and ov.get("kind") not in OVERLAP_KINDS:
                    probs.append(
                        Problem(
                            f"overlaps[{i}].kind",
                            "bad_field",
                            f"必須是 {OVERLAP_KINDS} 之一，收到 {ov.get('kind')!r}",
                        )
                    )
    roles = row.get("channel_roles")
    if roles is not None:
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            probs.append(Problem("channel_roles", "bad_field", "必須是字串清單"))
        elif isinstance(row.get("channels"), int) and len(roles) != row["channels"]:
            probs.append(
                Problem(
                    "channel_roles",
                    "bad_field",
                    f"長度 {len(roles)} 與 channels={row['channels']} 不符",
                )
            )
    text_fields = (
        "text_raw",
        "emotion",
        "response_style",
        "task",
        "instruction",
        "response_text",
        "response_audio",
    )
    for k in text_fields:
        if row.get(k) is not None and not isinstance(row[k], str):
            probs.append(Problem(k, "bad_field", "必須是字串"))
    if check_audio and not probs:
        probs += _check_audio_file(row, base_dir)
    return probs


def _check_audio_file(row: dict[str, Any], base_dir: str | os.PathLike | None) -> list[Problem]:
    path = resolve_audio(row, base_dir)
    try:
        info = audio_info(path)
    except AudioError as e:
        return [Problem("audio", e.reason, str(e))]
    probs: list[Problem] = []
    if info["sample_rate"] != row["sample_rate"]:
        probs.append(
            Problem(
                "sample_rate",
                "wrong_rate",
                f"宣告 {row['sample_rate']} Hz，檔案 {path} 為 {info['sample_rate']} Hz",
            )
        )
    if info["channels"] != row["channels"]:
        probs.append(
            Problem(
                "channels",
                "bad_field",
                f"宣告 {row['channels']}，檔案 {path} 為 {info['channels']}",
            )
        )
    end = row["offset"] + row["duration"]
    if end > info["duration"] + TIME_TOLERANCE:
        probs.append(
            Problem(
                "duration",
                "too_short",
                f"片段結束 {end:.3f}s 超出檔案 {path} 長度 {info['duration']:.3f}s",
            )
        )
    if row.get("response_audio"):
        rp = resolve_path(row["response_audio"], base_dir)
        try:
            audio_info(rp)
        except AudioError as e:
            probs.append(Problem("response_audio", e.reason, str(e)))
    return probs


def iter_manifest(
    path: str | os.PathLike, skips: SkipCounter | None = None
) -> Iterator[dict[str, Any]]:
    """逐列讀取清單；非 UTF-8 或無法解析的行會略過，並以「檔名:行號」記入 `skips`。"""
    p = Path(path)
    if not p.is_file():
        raise UserFileError(f"清單不存在：{p}")
    own = skips is None
    skips = SkipCounter() if own else skips
    n_bad = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            key = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.add(key, "non_utf8", str(e))
                n_bad += 1
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                skips.add(key, "bad_json", str(e))
                n_bad += 1
                continue
            if not isinstance(row, dict):
                skips.add(key, "bad_json", f"不是 JSON 物件：{type(row).__name__}")
                n_bad += 1
                continue
            yield row
    if own and n_bad:
        log.warning("%s：略過 %d 行壞資料 %s", p, n_bad, dict(skips.counts))


def read_manifest(
    path: str | os.PathLike, skips: SkipCounter | None = None
) -> list[dict[str, Any]]:
    """讀取整份清單為 list；壞行略過並計數（見 `iter_manifest`）。"""
    return list(iter_manifest(path, skips))


def require_rows(path: str | os.PathLike, flag: str = "--manifest") -> Path:
    """清單必須存在且至少有一列 JSON 物件，否則拋出使用者錯誤（壞行以「檔名:行號」指出）。"""
    p = Path(path)
    if not p.is_file():
        raise UserFileError(f"{flag} {p}：清單不存在")
    skips = SkipCounter()
    for _ in iter_manifest(p, skips):
        return p
    if not skips.items:
        raise empty_manifest(p, "檔案是空的")
    key, reason, detail = skips.items[0]
    more = f"，共 {len(skips)} 行壞資料" if len(skips) > 1 else ""
    raise empty_manifest(p, f"{key} {reason}：{detail}{more}")


def write_manifest(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """以原子方式寫出清單（先寫同資料夾的暫存檔、fsync，再改名）；回傳寫出的列數。"""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
