"""輸入管線的逐筆轉換：讀音訊、重取樣、對數梅爾、分詞、聲調與語言片段、語碼轉換增強。

每一筆的結果是一個 dict：成功時帶特徵與符號，失敗時只帶 `skip`（原因代碼）與 `detail`，
絕不拋出例外（壞資料在批次工作中略過並計數）。所有隨機性都由 (seed, epoch, 列索引) 決定，
同一筆在同一個 epoch 重算會得到完全相同的結果（恢復迭代器狀態時依賴這一點）。
"""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.audio.features import HOP_LENGTH, SAMPLE_RATE, log_mel_np
from speakllm_jax.audio.io import AudioError, load_audio
from speakllm_jax.data.manifest import resolve_audio
from speakllm_jax.data.shards import reader_for
from speakllm_jax.text.codeswitch import codeswitch_augment, language_of, split_spans
from speakllm_jax.text.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)

# 每個文字符號的語言編號：0 無（特殊符號、純空白、填充），其餘依片段種類。
TOKEN_LANG_IDS: dict[str, int] = {"none": 0, "zh": 1, "en": 2, "num": 3, "punct": 4}
# 整句語言編號。
UTT_LANG_IDS: dict[str, int] = {"unknown": 0, "zh": 1, "en": 2, "mixed": 3}
# 一個符號涵蓋多種片段時的優先序（漢字優先，再英文、數字、標點）。
_LANG_PRIORITY = (1, 2, 3, 4)

# 逐筆略過原因（音訊讀取的原因另見 `speakllm_jax.audio.io.REASONS`）。
SKIP_REASONS = (
    "bad_row",  # 缺 id／audio 或欄位型別錯誤
    "empty_text",  # 文字為空白
    "bad_text",  # 文字不是合法 Unicode（例如孤立代理字元，無法編成 UTF-8）
    "text_too_long",  # 符號數超過 max_text_tokens
    "too_long",  # 音訊超過 max_seconds 或最大桶長
    "too_short",  # 音訊短於 min_seconds
    "duration_mismatch",  # 全域計畫模式：實際長度明顯超過依清單 duration 排定的桶長
    "error",  # 其他意外錯誤（前幾筆會以 warning 記錄完整追蹤）
)
MAX_LOGGED_ERRORS = 5
# 全域計畫模式下，實際框數可超出計畫桶長而直接截掉的框數（清單 duration 取整誤差）。
PLAN_TOLERANCE_FRAMES = 3


def token_language_ids(text: str, token_bytes: list[bytes]) -> np.ndarray:
    """每個 BPE 符號的語言編號（見 `TOKEN_LANG_IDS`）。

    符號涵蓋的字元（位元組範圍有交集者）所屬片段種類中，依「漢字 > 英文 > 數字 > 標點」取一；
    只含空白或是特殊符號（空位元組）時為 0。`token_bytes` 串接後必須等於 `text` 的 UTF-8。
    """
    kind_of_char = np.zeros(len(text), dtype=np.int32)
    for s in split_spans(text):
        kind_of_char[s.start : s.end] = TOKEN_LANG_IDS[s.kind]
    byte_char = np.empty(len(text.encode("utf-8")), dtype=np.int64)
    pos = 0
    for ci, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        byte_char[pos : pos + n] = ci
        pos += n
    out = np.zeros(len(token_bytes), dtype=np.int32)
    pos = 0
    for t, b in enumerate(token_bytes):
        if b:
            kinds = set(kind_of_char[byte_char[pos : pos + len(b)]].tolist())
            for k in _LANG_PRIORITY:
                if k in kinds:
                    out[t] = k
                    break
        pos += len(b)
    return out


def mel_pad_value(mel: np.ndarray) -> float:
    """補齊區的梅爾值：等於 Whisper 對補零音訊算出的值（每筆最大值減 8 的下限，正規化後為 max − 2）。"""
    return float(mel.max()) - 2.0


class ExampleTransform:
    """把一筆 `{"index", "epoch", "row_index", "row"}` 轉成模型輸入或略過標記。

    執行緒安全：分詞器呼叫以鎖保護（Rust 分詞器不允許多執行緒同時借用）；可被 pickle
    送進 Grain 的多行程工作者（鎖在反序列化時重建）。
    """

    def __init__(self, config: Any, tokenizer: Any, bucket_boundaries: tuple[int, ...]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.boundaries = tuple(int(b) for b in bucket_boundaries)
        self._lock = threading.Lock()
        self._eos = int(tokenizer.eos_id)
        self._errors = 0
        self._byte_inv: dict[str, int] | None = None
        self._special: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
        row = element["row"]
        base = {
            "index": int(element["index"]),
            "id": str(row.get("id", "")) if isinstance(row, dict) else "",
        }
        if element.get("bucket") is not None:
            base["bucket"] = int(element["bucket"])  # 計畫模式：略過標記也帶桶長
        try:
            return {**base, **self._process(element)}
        except _Skip as s:
            return {**base, "skip": s.reason, "detail": s.detail}
        except AudioError as e:
            return {**base, "skip": e.reason, "detail": str(e)}
        except Exception as e:  # 批次工作不因單筆意外錯誤中斷，但記錄下來
            self._errors += 1
            if self._errors <= MAX_LOGGED_ERRORS:
                log.warning(
                    "第 %s 筆（id=%s）處理失敗，略過：%r",
                    base["index"],
                    base["id"],
                    e,
                    exc_info=True,
                )
            return {**base, "skip": "error", "detail": f"{type(e).__name__}: {e}"}

    def _token_bytes(self, ids: Any) -> list[bytes]:
        """同 `TextTokenizer.token_bytes`，但快取位元組反映射與特殊符號集合（每筆都要用）。"""
        if getattr(self, "_byte_inv", None) is None:
            # 延後匯入：transformers 很重，只在第一次解出詞元位元組時需要
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_inv = {v: k for k, v in bytes_to_unicode().items()}
            self._special = set(self.tokenizer.tok.all_special_tokens) | set(SPECIAL_TOKENS)
        inv, special = self._byte_inv, self._special
        out = []
        for t in self.tokenizer.tok.convert_ids_to_tokens([int(i) for i in ids]):
            out.append(b"" if t in special else bytes(inv[c] for c in t))
        return out

    def bucket_of(self, frames: int) -> int:
        """不小於 `frames` 的最小桶長；超過最大桶長時拋出 too_long 略過。"""
        for b in self.boundaries:
            if frames <= b:
                return b
        raise _Skip("too_long", f"{frames} 框超過最大桶長 {self.boundaries[-1]}")

    def _text(self, row: dict[str, Any], element: dict[str, Any]) -> tuple[str, str]:
        text = row.get("text")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Skip("bad_text", f"文字不是 UTF-8：{e}") from e
        if not isinstance(text, str):
            raise _Skip("bad_row", f"text 欄位不是字串：{type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Skip("bad_text", f"文字含無法編成 UTF-8 的字元：{e}") from e
        text = unicodedata.normalize("NFC", text).strip()
        if not text:
            raise _Skip("empty_text", "文字為空白")
        lang = row.get("language")
        cfg = self.config
        if cfg.codeswitch_prob > 0 and lang in ("zh", "mixed", None):
            rng = np.random.default_rng(
                (int(cfg.seed), int(element["epoch"]), int(element["row_index"]), 0x6373)
            )
            if rng.random() < cfg.codeswitch_prob:
                aug = codeswitch_augment(text, rng, prob=cfg.codeswitch_word_prob)
                if aug != text:
                    return unicodedata.normalize("NFC", aug), language_of(aug)
        if lang not in UTT_LANG_IDS:
            lang = language_of(text)
        return text, lang

    def _audio(self, row: dict[str, Any]) -> np.ndarray:
        cfg = self.config
        dur = row.get("duration")
        if isinstance(dur, int | float) and cfg.max_seconds and dur > cfg.max_seconds:
            raise _Skip("too_long", f"清單長度 {dur:.2f}s 超過上限 {cfg.max_seconds}s")
        if row.get("_shards"):
            audio = shard_audio(row, cfg.max_seconds or None)
        else:
            audio = self._file_audio(row)
        seconds = audio.shape[0] / SAMPLE_RATE
        if seconds < max(cfg.min_seconds, 0.02):
            raise _Skip("too_short", f"{seconds:.3f}s 短於 {cfg.min_seconds}s")
        return audio

    def _file_audio(self, row: dict[str, Any]) -> np.ndarray:
        cfg = self.config
        try:
            path = resolve_audio(row, row.get("_manifest_dir"))
        except ValueError as e:
            raise _Skip("bad_row", str(e)) from e
        offset = row.get("offset") or 0.0
        duration = row.get("duration")
        if not isinstance(offset, int | float) or (
            duration is not None and not isinstance(duration, int | float)
        ):
            raise _Skip("bad_row", f"offset／duration 不是數字：{offset!r} {duration!r}")
        return load_audio(
            Path(path),
            target_sr=SAMPLE_RATE,
            offset=float(offset),
            duration=None if duration is None else float(duration),
            mono=True,
            max_seconds=cfg.max_seconds or None,
        )

    def _process(self, element: dict[str, Any]) -> dict[str, Any]:
        row = element["row"]
        if row is None:
            raise _Skip("plan_padding", "全域計畫的填充位置")
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise _Skip("bad_row", "缺少 id 或 id 不是字串")
        text, lang = self._text(row, element)
        audio = self._audio(row)
        n_frames = audio.shape[0] // HOP_LENGTH
        planned = element.get("bucket")
        if planned is None:
            bucket = self.bucket_of(n_frames)
        else:
            # 全域計畫已依清單長度決定桶長；實際長度因取整多出的幾框截掉，差太多則略過。
            bucket = int(planned)
            if n_frames > bucket + PLAN_TOLERANCE_FRAMES:
                raise _Skip(
                    "duration_mismatch",
                    f"實際 {n_frames} 框超過計畫桶長 {bucket}（清單 duration 不準）",
                )
            audio = audio[: bucket * HOP_LENGTH]
        cfg = self.config
        with self._lock:
            enc = self.tokenizer.encode_with_tones(
                text, max_chars_per_token=cfg.max_chars_per_token
            )
            tb = self._token_bytes(enc["ids"])
        ids = np.asarray(enc["ids"], dtype=np.int32)
        tones = np.asarray(enc["tones"], dtype=np.int32).reshape(len(ids), cfg.max_chars_per_token)
        langs = token_language_ids(text, tb)
        if cfg.append_eos:
            ids = np.concatenate([ids, np.asarray([self._eos], np.int32)])
            tones = np.concatenate([tones, np.zeros((1, tones.shape[1]), np.int32)])
            langs = np.concatenate([langs, np.zeros(1, np.int32)])
        if len(ids) > cfg.max_text_tokens:
            raise _Skip("text_too_long", f"{len(ids)} 個符號超過 {cfg.max_text_tokens}")
        mel = log_mel_np(audio, n_mels=cfg.n_mels, pad_to_seconds=None)
        return {
            "mel": mel,
            "text_ids": ids,
            "tones": tones,
            "lang_ids": langs,
            "language": UTT_LANG_IDS.get(lang, 0),
            "bucket": bucket,
            "seconds": audio.shape[0] / SAMPLE_RATE,
        }


def shard_audio(row: dict[str, Any], max_seconds: float | None = None) -> np.ndarray:
    """從分片讀一列的 16 kHz 單聲道音訊，片段的取法與 `load_audio` 讀同一個 WAV 完全相同
    （offset／duration 換算成樣本的捨入、多聲道取平均），所以兩條路徑的梅爾逐位元相同。"""
    try:
        rec = reader_for(row["_shards"])[int(row["shard_record"])]
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise AudioError("corrupt", row.get("_shards", ""), f"分片紀錄讀取失敗：{e}") from e
    sr = int(rec["sample_rate"])
    if sr != SAMPLE_RATE:
        raise AudioError("wrong_rate", row["_shards"], f"分片為 {sr} Hz，預期 {SAMPLE_RATE} Hz")
    data = rec["wave"]
    total = data.shape[0] / sr
    offset = float(row.get("offset") or 0.0)
    duration = row.get("duration")
    if offset >= total:
        raise AudioError("too_short", row["_shards"], f"offset {offset:.3f}s 超出長度 {total:.3f}s")
    seg = (total - offset) if duration is None else min(float(duration), total - offset)
    if max_seconds is not None and seg > max_seconds:
        raise AudioError("too_long", row["_shards"], f"{seg:.2f}s 超過上限 {max_seconds}s")
    start = int(round(offset * sr))
    frames = data.shape[0] - start if duration is None else max(1, int(round(seg * sr)))
    data = data[start : start + frames]
    if data.shape[0] == 0:
        raise AudioError("empty", row["_shards"], "讀到 0 個取樣")
    return np.asarray(data.mean(axis=1), dtype=np.float32)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def attach_manifest_dir(rows: list[dict[str, Any]], manifest: str | os.PathLike) -> None:
    """為每列記下清單所在資料夾（相對音訊路徑以它為基準），就地修改。"""
    d = str(Path(manifest).resolve().parent)
    for r in rows:
        r["_manifest_dir"] = d
