"""離線語音符號抽取：依清單把每句音訊編成語音碼並存檔（PyTorch 端；CLI 為
`data/extract_speech_tokens.py`），以及示範語料的全雙工資料準備（`data/prepare_demo_speech.py`）。

抽取器：`voila`（`export.tokenizers.voila`）或 `cosyvoice2`（`export.tokenizers.cosyvoice2`）；
碼的儲存格式見 `speakllm_jax.data.speech_tokens`。
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from export.tokenizers.cosyvoice2 import CosyVoice2Tokenizer, make_demo_s3_tokenizer
from export.tokenizers.voila import VoilaTokenizer, make_demo_voila_tokenizer
from speakllm_jax.audio.io import AudioError, SkipCounter, load_audio
from speakllm_jax.cli import UserValueError
from speakllm_jax.data.adapters import build_manifests
from speakllm_jax.data.demo_data import duplex_paths, ensure_demo_corpus
from speakllm_jax.data.duplex_prep import instructions_to_dialogues
from speakllm_jax.data.manifest import read_manifest, resolve_audio
from speakllm_jax.data.speech_tokens import CodeStore

SUPPORTED_TOKENIZERS = ("voila", "cosyvoice2")

SpeechTokenizer = VoilaTokenizer | CosyVoice2Tokenizer


def load_speech_tokenizer(
    name: str, checkpoint: str | os.PathLike, device: str = "cpu", **kwargs: Any
) -> SpeechTokenizer:
    """依名稱建立語音符號抽取器：`voila`（EncodecModel 資料夾）或 `cosyvoice2`
    （含 s3tokenizer 版面 `speech_tokenizer_v2.pt` 的資料夾或該檔）。"""
    if name == "voila":
        return VoilaTokenizer(checkpoint, device=device, **kwargs)
    if name == "cosyvoice2":
        return CosyVoice2Tokenizer(checkpoint, device=device, **kwargs)
    raise UserValueError(f"未知的語音符號抽取器 {name!r}；可用：{SUPPORTED_TOKENIZERS}")


# ---------------------------------------------------------------- 抽取


@dataclass
class ExtractReport:
    """抽取結果：本次新抽、先前已完成而跳過、以及壞資料略過的計數。"""

    encoded: int = 0
    already_done: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    frames: int = 0

    def table(self) -> str:
        return (
            f"新抽 {self.encoded} 句（{self.frames} 框）；已完成跳過 {self.already_done} 句\n"
            + self.skips.table()
        )


def extract_speech_tokens(
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike,
    tokenizer: str = "voila",
    batch_size: int = 8,
    device: str = "cpu",
    max_seconds: float | None = 60.0,
    speech_tokenizer: SpeechTokenizer | None = None,
    channel: int | None = None,
    progress: bool | None = None,
) -> ExtractReport:
    """讀清單、依長度分批抽碼並寫入輸出（見模組說明）；壞音訊略過並依原因計數。

    `channel` 給定時只取該聲道（例如雙聲道對話的助理聲道 1），否則混成單聲道。
    `progress`：stderr 上逐句的 tqdm 進度條（每讀完一句前進一格，每累積 4 批編碼一次）；
    None 為 stderr 是終端機時才顯示，False 關閉。
    """
    if batch_size <= 0:
        raise UserValueError(f"--batch_size 必須為正，收到 {batch_size}")
    tok = speech_tokenizer or load_speech_tokenizer(tokenizer, checkpoint, device=device)
    report = ExtractReport()
    rows = read_manifest(manifest, report.skips)
    mdir = Path(manifest).resolve().parent
    store = CodeStore(output, tok.meta())
    todo: list[tuple[str, np.ndarray]] = []
    ids: list[str] = []
    seen: set[str] = set()
    bar = tqdm(
        rows,
        desc="抽取語音符號",
        unit="句",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    for row in bar:
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            report.skips.add(f"{manifest}:{rid!r}", "bad_row", "缺少 id")
            continue
        if rid in seen:
            report.skips.add(rid, "duplicate_id", "清單中重複的 id")
            continue
        seen.add(rid)
        ids.append(rid)
        if store.has(rid):
            report.already_done += 1
            continue
        try:
            path = resolve_audio(row, mdir)
            dur = row.get("duration")
            wave = load_audio(
                path,
                target_sr=tok.sample_rate,
                offset=float(row.get("offset") or 0.0),
                duration=None if dur is None else float(dur),
                mono=channel is None,
                max_seconds=max_seconds,
            )
            if channel is not None:
                if wave.ndim != 2 or channel >= wave.shape[0]:
                    raise AudioError(
                        "bad_channel", path, f"沒有聲道 {channel}（形狀 {wave.shape}）"
                    )
                wave = np.ascontiguousarray(wave[channel])
        except AudioError as e:
            report.skips.add_error(rid, e)
            continue
        except (ValueError, TypeError) as e:
            report.skips.add(rid, "bad_row", str(e))
            continue
        if wave.shape[-1] < getattr(tok, "min_samples", 1):
            detail = f"{wave.shape[-1]} 個樣本，少於 {tok.min_samples}"
            report.skips.add_error(rid, AudioError("too_short", path, detail))
            continue
        todo.append((rid, wave))
        if len(todo) >= batch_size * 4:
            _flush(tok, store, todo, batch_size, report)
            todo = []
    _flush(tok, store, todo, batch_size, report)
    bar.close()
    store.write_index(ids)
    report.skips.write_jsonl(store.skips_path())
    return report


def _flush(
    tok: SpeechTokenizer,
    store: CodeStore,
    todo: list[tuple[str, np.ndarray]],
    batch_size: int,
    report: ExtractReport,
) -> None:
    """依長度排序後分批編碼（減少補零），每批寫入一次。"""
    order = sorted(range(len(todo)), key=lambda i: todo[i][1].shape[-1])
    for s in range(0, len(order), batch_size):
        chunk = [todo[i] for i in order[s : s + batch_size]]
        codes = tok.encode([w for _, w in chunk])
        store.put_many({rid: c for (rid, _), c in zip(chunk, codes)})
        report.encoded += len(chunk)
        report.frames += int(sum(c.shape[-1] for c in codes))


def prepare_demo_speech(
    demo_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    tokenizer: str = "voila",
) -> dict[str, Path]:
    """建立示範全雙工清單並抽助理聲道語音碼（PyTorch；由 `data/prepare_demo_speech.py` 呼叫，訓練程序以子程序執行它）。

    `tokenizer="cosyvoice2"` 時改抽 CosyVoice2（S3Tokenizer v2）碼；沒給 `checkpoint` 時用
    示範用的小型隨機 S3 tokenizer。輸出位置見 `duplex_paths`。
    """
    root = ensure_demo_corpus(demo_dir)
    paths = duplex_paths(root, tokenizer)
    paths["dialogue"].parent.mkdir(parents=True, exist_ok=True)
    if not paths["dialogue"].exists():
        build_manifests(
            {
                "corpora": [
                    {"name": "dialogue", "adapter": "dialogue", "root": str(root / "dialogues")}
                ]
            },
            paths["dialogue"],
            log=lambda s: None,
        )
    if not paths["instructions"].exists():
        instructions_to_dialogues(
            root / "instructions" / "instructions.jsonl",
            paths["instructions"].parent / "instructions_stereo",
            paths["instructions"],
        )
    make_demo = make_demo_s3_tokenizer if tokenizer == "cosyvoice2" else make_demo_voila_tokenizer
    ckpt = Path(checkpoint) if checkpoint else make_demo(paths["tokenizer"])
    for name in ("dialogue", "instructions"):
        extract_speech_tokens(
            paths[name], paths[f"{name}_codes"], ckpt, tokenizer=tokenizer, channel=1
        )
    return paths
