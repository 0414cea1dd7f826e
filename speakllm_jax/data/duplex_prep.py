"""全雙工訓練資料的準備：把語音指令配對排成雙聲道「對話」，並找出每列的助理語音碼。

第 1 階段（SFT）與第 2 階段（雙工）共用同一個幀模型與樣本格式：語音指令配對
（指令音訊 + 回應文字 + 回應音訊）排成「使用者先說、停頓 `gap` 秒、助理回答」的雙聲道音訊，
加上對應的 turns，就和真正的雙聲道對話一樣能交給 `duplex.build_duplex_example`。
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.io import load_audio, write_audio
from speakllm_jax.data.manifest import resolve_path, write_manifest


def instruction_to_dialogue(
    row: dict[str, Any], base_dir: str | os.PathLike, out_dir: str | os.PathLike, gap: float = 0.6
) -> dict[str, Any]:
    """一筆語音指令配對 → 一列雙聲道對話（寫出立體聲 wav，回傳清單列）。

    需要欄位 `instruction_audio`、`response_audio`、`response_text`（路徑相對於 `base_dir`）。
    """
    rid = str(row.get("id", "?"))
    for k in ("instruction_audio", "response_audio", "response_text"):
        if not row.get(k):
            raise ValueError(f"{rid}: 語音指令列缺少欄位 {k!r}")
    user = load_audio(resolve_path(row["instruction_audio"], base_dir), target_sr=SAMPLE_RATE)
    reply = load_audio(resolve_path(row["response_audio"], base_dir), target_sr=SAMPLE_RATE)
    start = len(user) + int(round(gap * SAMPLE_RATE))
    total = start + len(reply) + int(round(0.2 * SAMPLE_RATE))
    wave = np.zeros((2, total), np.float32)
    wave[0, : len(user)] = user
    wave[1, start : start + len(reply)] = reply
    out = Path(out_dir) / f"{rid}.wav"
    write_audio(out, wave, SAMPLE_RATE)
    return {
        "id": rid,
        "audio": str(out.resolve()),
        "offset": 0.0,
        "duration": total / SAMPLE_RATE,
        "sample_rate": SAMPLE_RATE,
        "channels": 2,
        "channel_roles": ["user", "assistant"],
        "text": str(row.get("response_text", "")),
        "language": str(row.get("language", "mixed")),
        "speaker": str(row.get("speaker", "unknown")),
        "corpus": str(row.get("corpus", "instructions")),
        "split": str(row.get("split", "train")),
        "task": str(row.get("task", "speech_instruction")),
        "emotion": row.get("emotion"),
        "response_style": row.get("response_style"),
        "turns": [
            {
                "speaker": "user",
                "start": 0.0,
                "end": len(user) / SAMPLE_RATE,
                "text": str(row.get("instruction_text", "")),
                "kind": "utterance",
            },
            {
                "speaker": "assistant",
                "start": start / SAMPLE_RATE,
                "end": (start + len(reply)) / SAMPLE_RATE,
                "text": str(row["response_text"]),
                "kind": "utterance",
            },
        ],
        "overlaps": [],
    }


def instructions_to_dialogues(
    jsonl: str | os.PathLike,
    out_dir: str | os.PathLike,
    manifest: str | os.PathLike,
    gap: float = 0.6,
) -> Path:
    """整份語音指令 JSONL → 雙聲道對話清單。"""
    src = Path(jsonl)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(instruction_to_dialogue(json.loads(line), src.parent, out, gap))
    write_manifest(manifest, rows)
    return Path(manifest)
