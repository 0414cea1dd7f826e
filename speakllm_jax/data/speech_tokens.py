"""抽好的語音碼的儲存與讀取（不匯入 PyTorch；訓練與資料管線讀這裡）。

抽取器（Voila-Tokenizer、CosyVoice2 S3Tokenizer v2，PyTorch）在 `export/tokenizers/`，
CLI 為 `data/extract_speech_tokens.py`。

輸出（以語句 id 為鍵，可續跑）：
    資料夾        每句一個 `<安全檔名>.npy`（int16，[n_q, frames]；CosyVoice2 為 [1, frames]），
                  外加 `meta.json`、`index.jsonl`（id → 檔名、框數）、`skips.jsonl`；
    單一 `.npz`   鍵為語句 id，另有 `__meta__`（JSON 字串）；略過明細寫在 `<檔名>.skips.jsonl`。
所有寫入都先寫暫存檔再 `os.replace`，中途被終止不會留下壞檔；重跑時已完成的 id 直接跳過。
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.cli import UserValueError

# ---------------------------------------------------------------- 輸出儲存


def safe_name(utt_id: str) -> str:
    """語句 id → 安全檔名；有改寫時附上 id 雜湊避免碰撞。"""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", utt_id).strip(".") or "_"
    if s != utt_id or len(s) > 150:
        s = f"{s[:150]}-{hashlib.sha1(utt_id.encode('utf-8')).hexdigest()[:10]}"
    return s


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CodeStore:
    """以語句 id 為鍵的碼儲存（資料夾或單一 .npz），支援續跑。"""

    def __init__(self, output: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = Path(output)
        self.meta = meta
        self.is_npz = self.path.suffix == ".npz"
        self._npz: dict[str, np.ndarray] = {}
        if self.is_npz:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                with np.load(self.path, allow_pickle=False) as z:
                    self._npz = {k: z[k] for k in z.files}
                old = json.loads(str(self._npz.pop("__meta__", "{}")))
                self._check_meta(old)
        else:
            if self.path.exists() and not self.path.is_dir():
                raise UserValueError(
                    f"輸出 {self.path} 已存在且不是資料夾（單一檔案請用 .npz 副檔名）"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            mp = self.path / "meta.json"
            if mp.exists():
                self._check_meta(json.loads(mp.read_text(encoding="utf-8")))
            else:
                data = json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8")
                _atomic_write_bytes(mp, lambda f: f.write(data))

    def _check_meta(self, old: dict[str, Any]) -> None:
        diff = {k: (old.get(k), v) for k, v in self.meta.items() if old and old.get(k) != v}
        if diff:
            raise UserValueError(f"{self.path}：既有輸出的設定與目前不同 {diff}；請換輸出位置")

    def file_for(self, utt_id: str) -> Path:
        return self.path / f"{safe_name(utt_id)}.npy"

    def has(self, utt_id: str) -> bool:
        if self.is_npz:
            return utt_id in self._npz
        return self.file_for(utt_id).is_file()

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """寫入一批；.npz 模式每批整檔原子重寫。"""
        if self.is_npz:
            self._npz.update(items)
            payload = dict(self._npz)
            payload["__meta__"] = np.asarray(json.dumps(self.meta))
            _atomic_write_bytes(self.path, lambda f: np.savez(f, **payload))
            return
        for k, v in items.items():
            _atomic_write_bytes(self.file_for(k), lambda f, v=v: np.save(f, v))

    def get(self, utt_id: str) -> np.ndarray:
        if self.is_npz:
            return self._npz[utt_id]
        return np.load(self.file_for(utt_id))

    def write_index(self, ids: Sequence[str]) -> None:
        """資料夾模式：寫出 id → 檔名與框數的索引（只列已完成者）。"""
        if self.is_npz:
            return
        lines = []
        for i in ids:
            if self.has(i):
                frames = int(np.load(self.file_for(i), mmap_mode="r").shape[-1])
                lines.append(
                    json.dumps(
                        {"id": i, "file": self.file_for(i).name, "frames": frames},
                        ensure_ascii=False,
                    )
                )
        data = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
        _atomic_write_bytes(self.path / "index.jsonl", lambda f: f.write(data))

    def skips_path(self) -> Path:
        if self.is_npz:
            return self.path.with_name(self.path.name + ".skips.jsonl")
        return self.path / "skips.jsonl"


def load_codes(output: str | os.PathLike) -> dict[str, np.ndarray]:
    """讀回抽好的碼：{語句 id: [n_q, frames]}（資料夾依 index.jsonl，或 .npz）。"""
    p = Path(output)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "__meta__"}
    out = {}
    with (p / "index.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = np.load(p / r["file"])
    return out
