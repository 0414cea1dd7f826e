"""依音訊長度分桶並組成靜態形狀的批次；略過的樣本依原因計數並隨批次的 `skipped` 欄位送出。

`BucketBatchIterDataset` 是一個 Grain `IterDataset`：從上游（逐筆轉換後的串流）取出樣本，
依桶長放進各自的緩衝區，某一桶滿 `batch_size` 筆即送出一個批次。略過標記不進緩衝區，
只累加到「自上一個批次以來的略過數」，隨下一個批次的 `skipped` 欄位送出。

檢查點：迭代器狀態是 JSON 可序列化的 dict——上游狀態、各桶緩衝中樣本的全域索引、
尚未送出的略過數。恢復時以隨機存取的 `MapDataset` 依索引重算緩衝中的樣本
（逐筆轉換是確定性的），因此恢復後的批次序列與未中斷時完全相同。
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from speakllm_jax.data.schema import BatchSchema, Field
from speakllm_jax.data.transforms import mel_pad_value

# ASR 管線批次的綱要（唯一的一份；`utt_id` 與 `skipped` 不是數值陣列，不在其中）。
# 維度：mel_frames = 桶長（梅爾框，100 Hz）、text_len = max_text_tokens、chars = max_chars_per_token。
ASR_BATCH = BatchSchema(
    [
        Field("mel", ("n_mels", "mel_frames"), "float32"),
        Field("mel_lengths", (), "int32"),
        Field("mel_mask", ("mel_frames",), "bool"),
        Field("text_ids", ("text_len",), "int32"),
        Field("text_mask", ("text_len",), "bool"),
        Field("text_lengths", (), "int32"),
        Field("tones", ("text_len", "chars"), "int32"),
        Field("lang_ids", ("text_len",), "int32"),
        Field("language", (), "int32"),
        Field("example_mask", (), "bool"),
    ]
)


def collate(
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    bucket: int,
    n_mels: int,
    max_text_tokens: int,
    max_chars_per_token: int,
    skipped: Mapping[str, int],
) -> dict[str, Any]:
    """把同桶的樣本補齊成靜態形狀的批次（不足 `batch_size` 的列全部遮掉）。

    欄位：`mel` [B, n_mels, bucket]、`mel_lengths` [B]、`mel_mask` [B, bucket]、
    `text_ids` / `text_mask` / `lang_ids` [B, L]、`text_lengths` [B]、`tones` [B, L, K]、
    `language` [B]、`example_mask` [B]、`utt_id` [B]（字串，空字串為填充列）、
    `skipped` {原因: 自上一批以來略過的筆數}。梅爾補齊值見 `transforms.mel_pad_value`。
    """
    b, t, length, k = batch_size, bucket, max_text_tokens, max_chars_per_token
    sizes = {"n_mels": n_mels, "mel_frames": t, "text_len": length, "chars": k}
    z = ASR_BATCH.zeros(
        b,
        sizes,
        ("mel", "mel_lengths", "text_ids", "tones", "lang_ids", "text_lengths", "language"),
    )
    mel, mel_lengths, text_ids, tones = z["mel"], z["mel_lengths"], z["text_ids"], z["tones"]
    lang_ids, text_lengths, language = z["lang_ids"], z["text_lengths"], z["language"]
    ids = [""] * b
    for i, ex in enumerate(examples):
        m = ex["mel"]
        n = m.shape[1]
        mel[i, :, :n] = m
        mel[i, :, n:] = mel_pad_value(m)
        mel_lengths[i] = n
        n_tok = len(ex["text_ids"])
        text_ids[i, :n_tok] = ex["text_ids"]
        tones[i, :n_tok] = ex["tones"][:, :k]
        lang_ids[i, :n_tok] = ex["lang_ids"]
        text_lengths[i] = n_tok
        language[i] = ex["language"]
        ids[i] = ex["id"]
    return {
        "mel": mel,
        "mel_lengths": mel_lengths,
        "mel_mask": np.arange(t)[None, :] < mel_lengths[:, None],
        "text_ids": text_ids,
        "text_mask": np.arange(length)[None, :] < text_lengths[:, None],
        "text_lengths": text_lengths,
        "tones": tones,
        "lang_ids": lang_ids,
        "language": language,
        "example_mask": np.arange(b) < len(examples),
        "utt_id": np.asarray(ids, dtype=str),
        "skipped": {k2: int(v) for k2, v in sorted(skipped.items()) if v},
    }


class PlannedCollate:
    """依全域批次計畫組批（`PipelineConfig.sync_buckets`）：一批的 B 筆來自同一個計畫批次、同一桶長。

    略過的樣本與計畫中的填充位置留成遮罩列（不補位，確保各行程每一步形狀與步數相同）；
    `skipped` 為本批本行程略過的筆數。可被 pickle。
    """

    def __init__(
        self, batch_size: int, n_mels: int, max_text_tokens: int, max_chars_per_token: int
    ) -> None:
        self.batch_size = int(batch_size)
        self.n_mels = int(n_mels)
        self.max_text_tokens = int(max_text_tokens)
        self.k = int(max_chars_per_token)

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        buckets = {int(e["bucket"]) for e in elements}
        if len(buckets) != 1:
            raise RuntimeError(f"計畫批次混到不同桶長 {sorted(buckets)}：索引配置錯誤")
        bucket = buckets.pop()
        skipped: Counter = Counter()
        rows: list[dict[str, Any] | None] = []
        for e in elements:
            if "skip" in e:
                if e["skip"] != "plan_padding":
                    skipped[e["skip"]] += 1
                rows.append(None)
            else:
                rows.append(e)
        batch = collate(
            [r for r in rows if r is not None],
            self.batch_size,
            bucket,
            self.n_mels,
            self.max_text_tokens,
            self.k,
            skipped,
        )
        # 保持每列在計畫中的位置（遮罩列留在原處），方便除錯與對照。
        order = [i for i, r in enumerate(rows) if r is not None]
        if order != list(range(len(order))):
            dense = {k: v for k, v in batch.items() if k != "skipped"}
            placed = {}
            for k, v in dense.items():
                out = np.zeros_like(v)
                out[order] = v[: len(order)]
                placed[k] = out
            placed["skipped"] = batch["skipped"]
            batch = placed
        return batch


def array_fields(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """只留下可送上裝置的數值陣列（去掉 `utt_id` 與 `skipped`）。"""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


class BucketBatchIterDataset(grain.IterDataset):
    """依 `bucket` 欄位分桶批次化（見模組說明）。

    `source` 是上游所依據、可隨機存取的 `MapDataset`（元素帶 `index` 欄位），只用於恢復狀態時
    重算緩衝中的樣本；它不是 Grain 意義上的 parent，因此多行程預取切片時不會被切到。
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        source: grain.MapDataset,
        *,
        boundaries: Sequence[int],
        batch_size: int,
        n_mels: int,
        max_text_tokens: int,
        max_chars_per_token: int,
        drop_remainder: bool,
    ) -> None:
        super().__init__(parent)
        self._source = source
        self._kw = dict(
            boundaries=tuple(int(x) for x in boundaries),
            batch_size=int(batch_size),
            n_mels=int(n_mels),
            max_text_tokens=int(max_text_tokens),
            max_chars_per_token=int(max_chars_per_token),
            drop_remainder=bool(drop_remainder),
        )

    def __iter__(self) -> BucketBatchIterator:
        return BucketBatchIterator(self._parent.__iter__(), self._source, **self._kw)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset({self._kw})"


class BucketBatchIterator(grain.DatasetIterator):
    """`BucketBatchIterDataset` 的迭代器；狀態見模組說明。"""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        source: grain.MapDataset,
        *,
        boundaries: tuple[int, ...],
        batch_size: int,
        n_mels: int,
        max_text_tokens: int,
        max_chars_per_token: int,
        drop_remainder: bool,
    ) -> None:
        super().__init__(parent)
        self._source = source
        self._boundaries = boundaries
        self._batch_size = batch_size
        self._n_mels = n_mels
        self._max_text_tokens = max_text_tokens
        self._k = max_chars_per_token
        self._drop_remainder = drop_remainder
        self._buffers: dict[int, list[dict[str, Any]]] = {b: [] for b in boundaries}
        self._pending: Counter = Counter()
        self._exhausted = False

    def _emit(self, bucket: int, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(
            examples,
            self._batch_size,
            bucket,
            self._n_mels,
            self._max_text_tokens,
            self._k,
            self._pending,
        )
        self._pending = Counter()
        return batch

    def __next__(self) -> dict[str, Any]:
        while not self._exhausted:
            try:
                ex = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if "skip" in ex:
                self._pending[ex["skip"]] += 1
                continue
            buf = self._buffers[int(ex["bucket"])]
            buf.append(ex)
            if len(buf) == self._batch_size:
                self._buffers[int(ex["bucket"])] = []
                return self._emit(int(ex["bucket"]), buf)
        # 上游結束：依設定送出或丟棄未滿的桶（由短到長）。
        for b in self._boundaries:
            buf = self._buffers[b]
            if not buf:
                continue
            self._buffers[b] = []
            if self._drop_remainder:
                self._pending["dropped_remainder"] += len(buf)
                continue
            return self._emit(b, buf)
        if sum(self._pending.values()):
            # 最後還有未送出的略過數：送一個全遮罩的批次，計數不會遺失。
            return self._emit(self._boundaries[0], [])
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "buffers": {str(b): [int(e["index"]) for e in buf] for b, buf in self._buffers.items()},
            "pending_skips": {k: int(v) for k, v in self._pending.items()},
            "exhausted": bool(self._exhausted),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        buffers: dict[int, list[dict[str, Any]]] = {b: [] for b in self._boundaries}
        for key, idxs in state["buffers"].items():
            b = int(key)
            if b not in buffers:
                raise ValueError(f"檢查點的桶長 {b} 不在目前設定 {self._boundaries} 中")
            for i in idxs:
                ex = self._source[int(i)]
                if "skip" in ex or int(ex["bucket"]) != b:
                    raise ValueError(f"恢復狀態時第 {i} 筆重算結果不同：資料或設定已改變")
                buffers[b].append(ex)
        self._buffers = buffers
        self._pending = Counter({k: int(v) for k, v in state["pending_skips"].items()})
        self._exhausted = bool(state["exhausted"])

    def __str__(self) -> str:
        return f"BucketBatchIterator(boundaries={self._boundaries}, batch_size={self._batch_size})"
