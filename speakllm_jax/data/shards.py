"""ArrayRecord 分片：離線鏈的輸出格式，Grain 在訓練主機上直接讀，不再逐檔解碼、重取樣。

一個分片資料夾：

    DIR/shard-00000-of-00004.array_record   每筆一個 msgpack 紀錄（見 `encode_record`）
    DIR/shard-00000-of-00004.json           完成標記：輸入指紋、筆數、位元組數、該分片的清單列與略過
    DIR/index.json                          分片清單與每片筆數（全部完成後才寫）
    DIR/manifest.jsonl                      所有輸出列（清單欄位 + `shard_record` 全域紀錄編號）
    DIR/manifest.skipped.jsonl              略過明細（鍵、原因、說明）
    DIR/audio/…                             選用：同樣的 16 kHz WAV（JSONL+WAV 路徑的輸入）

紀錄的位元組只取決於輸入與設定（鍵排序的 msgpack、未壓縮、group_size 1），
同樣的輸入重跑得到逐位元相同的檔案。
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordWriter

from speakllm_jax.cli import UserFileError
from speakllm_jax.data.manifest import read_manifest

SHARD_FORMAT = "speakllm-shards/1"
# 每筆一組（隨機存取只讀一筆）；音訊本身已是 PCM／FLAC，不再壓縮。
WRITER_OPTIONS = "group_size:1,uncompressed"
AUDIO_FORMATS = ("pcm16", "flac")
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "manifest.skipped.jsonl"


def shard_name(index: int, count: int) -> str:
    """分片檔名（不含副檔名）。"""
    return f"shard-{index:05d}-of-{count:05d}"


def _sorted(obj: Any) -> Any:
    """遞迴排序 dict 的鍵，讓 msgpack 的位元組與插入順序無關。"""
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def encode_audio(wave: np.ndarray, sr: int, audio_format: str = "pcm16") -> bytes:
    """波形（[samples] 或 [channels, samples]）→ 16 位元 PCM（交錯）或 FLAC 位元組。

    由 libsndfile 轉換，與 `write_audio` 寫 16 位元 WAV 的量化完全相同。
    """
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format 必須是 {AUDIO_FORMATS} 之一，收到 {audio_format!r}")
    w = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    if w.ndim == 2:
        w = w.T
    buf = io.BytesIO()
    fmt = "RAW" if audio_format == "pcm16" else "FLAC"
    sf.write(buf, w, int(sr), format=fmt, subtype="PCM_16")
    return buf.getvalue()


def decode_audio(record: dict[str, Any]) -> np.ndarray:
    """紀錄中的音訊 → float32 `[samples, channels]`（與 soundfile 讀 16 位元 WAV 的值相同）。"""
    ch = int(record["channels"])
    if record["audio_format"] == "pcm16":
        pcm = np.frombuffer(record["audio"], dtype="<i2").reshape(-1, ch)
        return pcm.astype(np.float32) / np.float32(32768.0)
    data, _ = sf.read(io.BytesIO(record["audio"]), dtype="float32", always_2d=True)
    return data


def encode_record(
    row: dict[str, Any],
    wave: np.ndarray,
    sr: int,
    audio_format: str = "pcm16",
    codes: dict[str, np.ndarray] | None = None,
    tones: list[int] | None = None,
    response: np.ndarray | None = None,
) -> bytes:
    """一筆輸出：清單欄位、音訊位元組、聲調（每字元，0 為非漢字）與選用的語音碼。"""
    w = np.asarray(wave)
    rec: dict[str, Any] = {
        "row": {k: v for k, v in row.items() if not k.startswith("_")},
        "audio": encode_audio(w, sr, audio_format),
        "audio_format": audio_format,
        "sample_rate": int(sr),
        "channels": 1 if w.ndim == 1 else int(w.shape[0]),
        "num_samples": int(w.shape[-1]),
        "tones": bytes(np.asarray(tones or [], np.int8).tobytes()),
        "codes": {
            name: {"shape": list(c.shape), "data": np.ascontiguousarray(c, "<i2").tobytes()}
            for name, c in sorted((codes or {}).items())
        },
    }
    if response is not None:
        rec["response_audio"] = encode_audio(response, sr, audio_format)
    return msgpack.packb(_sorted(rec), use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """`encode_record` 的反向：回傳 dict，另加 `wave`（float32 `[samples, channels]`）、
    `tones_array`（int8）與 `codes_arrays`（{名稱: int16 陣列}）。"""
    rec = msgpack.unpackb(data, raw=False)
    rec["wave"] = decode_audio(rec)
    rec["tones_array"] = np.frombuffer(rec["tones"], np.int8)
    rec["codes_arrays"] = {
        k: np.frombuffer(v["data"], "<i2").reshape(v["shape"]) for k, v in rec["codes"].items()
    }
    return rec


def write_shard(path: str | os.PathLike, records: list[bytes]) -> int:
    """寫一個 ArrayRecord 分片（先寫暫存檔再改名，中途被終止不會留下壞檔）；回傳位元組數。"""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        w = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        for r in records:
            w.write(r)
        w.close()
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p.stat().st_size


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """鍵排序的 JSON，先寫暫存檔再改名。"""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1), "utf-8")
    os.replace(tmp, p)


class ShardReader:
    """分片資料夾的隨機存取讀取器：全域紀錄編號 → 解碼後的紀錄。

    以 Grain 的 `ArrayRecordDataSource` 開檔；可被 pickle（送進 Grain 的多行程工作者時只帶路徑，
    到了該行程第一次讀時才開檔）。
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = read_index(self.directory)
        self.files = [str(self.directory / s["file"]) for s in index["shards"]]
        self.num_records = int(sum(s["records"] for s in index["shards"]))
        self._source: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_records

    def raw(self, index: int) -> bytes:
        """第 `index` 筆的原始位元組。"""
        if self._source is None:
            with self._lock:
                if self._source is None:
                    # 延後匯入：grain 很重，只讀 ArrayRecord 分片時需要
                    import grain

                    self._source = grain.sources.ArrayRecordDataSource(self.files)
        return self._source[int(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self.raw(index))


class TfdsReader:
    """tfds ArrayRecord 檔的隨機存取：全域編號 → 紀錄位元組（同 `ShardReader` 介面）。"""

    def __init__(self, files: list[str]) -> None:
        self.files = list(files)
        self._source: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"])

    def example(self, index: int) -> Any:
        # 延後匯入：tensorflow_datasets 很重，只讀 TFDS 分片時需要
        from tensorflow_datasets.proto import tf_example_pb2

        if self._source is None:
            with self._lock:
                if self._source is None:
                    # 延後匯入：grain 很重，只讀 ArrayRecord 分片時需要
                    import grain

                    self._source = grain.sources.ArrayRecordDataSource(self.files)
        return tf_example_pb2.Example.FromString(self._source[int(index)])

    def __len__(self) -> int:
        if self._source is None:
            self.example(0)
        return len(self._source)

    def raw(self, index: int) -> bytes:
        return self.example(index).features.feature["record"].bytes_list.value[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self.raw(index))


_READERS: dict[str, Any] = {}
_READERS_LOCK = threading.Lock()


def reader_for(directory: str | os.PathLike) -> Any:
    """每個行程每個分片資料夾共用一個讀取器；`tfds-files:[…]` 鍵為 tfds 建好的檔案。"""
    key = str(directory)
    with _READERS_LOCK:
        r = _READERS.get(key)
        if r is None:
            if key.startswith("tfds-files:"):
                r = TfdsReader(json.loads(key.removeprefix("tfds-files:")))
            else:
                r = ShardReader(key)
            _READERS[key] = r
        return r


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """讀 `index.json`；不存在或格式不符時以 `UserFileError` 指出檔案。"""
    p = Path(directory) / INDEX_FILE
    if not p.is_file():
        raise UserFileError(f"{p}：分片索引不存在（離線鏈尚未完成？）")
    try:
        index = json.loads(p.read_text("utf-8"))
    except ValueError as e:
        raise UserFileError(f"{p}：不是合法的 JSON：{e}") from e
    if index.get("format") != SHARD_FORMAT:
        raise UserFileError(f"{p}：format 欄位應為 {SHARD_FORMAT!r}，收到 {index.get('format')!r}")
    return index


def shard_rows(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """分片資料夾的清單列（只有清單欄位，不含音訊），每列帶 `_shards`（資料夾）與
    `shard_record`（全域紀錄編號）；輸入管線依此從分片讀音訊。"""
    d = Path(directory).resolve()
    index = read_index(d)
    rows = read_manifest(d / MANIFEST_FILE)
    total = sum(s["records"] for s in index["shards"])
    if len(rows) != total:
        raise UserFileError(f"{d / MANIFEST_FILE}：{len(rows)} 列，但索引記載 {total} 筆紀錄")
    for r in rows:
        r["_shards"] = str(d)
        r["_manifest_dir"] = str(d)
    return rows
