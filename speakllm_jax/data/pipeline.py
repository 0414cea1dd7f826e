"""由清單建立 Grain 輸入管線：每個 epoch 確定性洗牌、依行程分片、逐筆轉換、分桶批次化。

兩種分桶方式（`PipelineConfig.sync_buckets`）：

動態分桶（單一行程的預設）：

    清單列 → EpochShardSource（epoch e 以 (seed, e) 洗牌整份清單，再取本行程的 [p::P]）
          → MapDataset.map(ExampleTransform)（讀音訊、重取樣、對數梅爾、分詞、聲調、語言）
          → to_iter_dataset（執行緒預取）
          → BucketBatchIterDataset（依實際梅爾框數分桶，補齊成靜態形狀，略過數隨批次送出）

全域計畫（多行程的預設）：

    清單列 → GlobalPlanSource（epoch e 以 (seed, e) 的排列依清單 duration 排成全域批次，
             行程 p 取每個全域批次的第 p 段）
          → MapDataset.map(ExampleTransform) → MapDataset.batch(PlannedCollate)
          → to_iter_dataset（執行緒預取）

兩者之後都可選用 mp_prefetch（config.workers > 0）。各行程在同一 epoch 讀到互斥的部分，
聯集即整份清單；每個 epoch 的排列不同。全域計畫讓每一步所有行程的桶長相同、步數相同
（`jax.make_array_from_process_local_data` 組全域批次時需要）；略過的樣本留成遮罩列。
迭代器狀態（`get_state()`）可 JSON 序列化，`set_state()` 後的批次序列與未中斷時完全一致。
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from speakllm_jax.audio.features import HOP_LENGTH, SAMPLE_RATE
from speakllm_jax.audio.io import SkipCounter
from speakllm_jax.cli import UserFileError
from speakllm_jax.data.batching import BucketBatchIterDataset, PlannedCollate
from speakllm_jax.data.manifest import read_manifest
from speakllm_jax.data.shards import shard_rows
from speakllm_jax.data.tfds_builders import tfds_rows
from speakllm_jax.data.transforms import ExampleTransform, attach_manifest_dir
from speakllm_jax.text.tokenizer import TextTokenizer


@dataclass
class PipelineConfig:
    """輸入管線設定（可由 ml_collections.ConfigDict 或 dict 以 `from_mapping` 建立）。

    `bucket_boundaries` 以梅爾框（100 Hz）計，須為 `frame_multiple` 的倍數（預設 4：
    Whisper 第二層卷積步幅 2，再疊 2 框到 25 Hz）。長於最大桶長或 `max_seconds` 的樣本略過。
    `num_epochs=None` 表示無限重複（訓練用）；有限 epoch 且動態分桶時各行程的批次數可能不同。
    `codeswitch_prob` 為每筆套用語碼轉換增強的機率，`codeswitch_word_prob` 為詞典詞被替換的機率。
    `sync_buckets`：True 時用全域批次計畫（各行程每一步同桶長、同步數，多主機必需）；
    False 時各行程依實際長度動態分桶；None（預設）表示行程數大於 1 時才用全域計畫。
    """

    batch_size: int = 8
    bucket_boundaries: tuple[int, ...] = (500, 1000, 1500, 2000, 3000)
    frame_multiple: int = 4
    drop_remainder: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    n_mels: int = 80
    max_seconds: float = 30.0
    min_seconds: float = 0.1
    max_text_tokens: int = 256
    max_chars_per_token: int = 4
    append_eos: bool = True
    codeswitch_prob: float = 0.0
    codeswitch_word_prob: float = 0.5
    read_threads: int = 2
    prefetch_buffer_size: int = 16
    workers: int = 0
    worker_buffer_size: int = 2
    sync_buckets: bool | None = None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PipelineConfig:
        """由 dict／ConfigDict 建立；未知欄位明確報錯。"""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"PipelineConfig 沒有欄位 {unknown}；可用欄位：{sorted(names)}")
        if "bucket_boundaries" in d:
            d["bucket_boundaries"] = tuple(int(x) for x in d["bucket_boundaries"])
        return cls(**d)

    def validate(self) -> None:
        """檢查設定一致性，錯誤時以欄位名報錯。"""
        b = tuple(self.bucket_boundaries)
        if not b or list(b) != sorted(set(b)) or b[0] <= 0:
            raise ValueError(f"bucket_boundaries 必須為遞增的正整數，收到 {b}")
        bad = [x for x in b if x % self.frame_multiple]
        if bad:
            raise ValueError(
                f"bucket_boundaries {bad} 不是 frame_multiple={self.frame_multiple} 的倍數"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size 必須為正，收到 {self.batch_size}")
        if self.max_text_tokens <= 0 or self.max_chars_per_token <= 0:
            raise ValueError("max_text_tokens 與 max_chars_per_token 必須為正")
        if not 0.0 <= self.codeswitch_prob <= 1.0:
            raise ValueError(f"codeswitch_prob 必須在 [0, 1]，收到 {self.codeswitch_prob}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs 必須為正或 None，收到 {self.num_epochs}")

    @property
    def max_frames(self) -> int:
        return int(self.bucket_boundaries[-1])


class EpochShardSource:
    """隨機存取來源：全域索引 i → 第 i // n 個 epoch 中本行程分片的第 i % n 筆。

    epoch e 的排列為 `np.random.default_rng((seed, e)).permutation(N)`（`shuffle=False` 時為原順序），
    本行程取排列的 `[process_index::process_count]`。
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        process_index: int,
        process_count: int,
    ) -> None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} 不在 [0, {process_count}) 內")
        self.rows = list(rows)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        n = len(self.rows)
        self.shard_len = len(range(self.process_index, n, self.process_count))
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.shard_len == 0:
            return 0
        if self.num_epochs is None:
            return sys.maxsize
        return self.num_epochs * self.shard_len

    def epoch_order(self, epoch: int) -> np.ndarray:
        """epoch 的全域排列（所有行程相同）。"""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            n = len(self.rows)
            perm = (
                np.random.default_rng((self.seed, int(epoch))).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = perm
        return perm

    def shard_rows(self, epoch: int) -> np.ndarray:
        """本行程在 epoch 中依序讀到的列索引。"""
        return self.epoch_order(epoch)[self.process_index :: self.process_count]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        epoch, j = divmod(index, self.shard_len)
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise IndexError(index)
        r = int(self.epoch_order(epoch)[self.process_index + j * self.process_count])
        return {"index": index, "epoch": epoch, "row_index": r, "row": self.rows[r]}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_perm_cache"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"EpochShardSource(rows={len(self.rows)}, process={self.process_index}/"
            f"{self.process_count}, epochs={self.num_epochs})"
        )


class GlobalPlanSource:
    """全域批次計畫來源：所有行程依同一份計畫，每一步取同一個全域批次中自己的 B 筆。

    epoch e 依 `(seed, e)` 的排列走過所有列，依清單 `duration` 估計的梅爾框數把列放進各桶，
    某桶湊滿 `batch_size × process_count` 筆即成為一個全域批次；epoch 結束時未滿的桶依
    `drop_remainder` 丟棄或以填充位置補滿。行程 p 取每個全域批次的 `[p·B, (p+1)·B)`。
    每個 epoch 的全域批次數只取決於各桶的筆數，因此每個 epoch 相同、各行程相同。
    長度不合（過長、過短、沒有 duration）的列在建計畫時就排除，計入 `plan_skips`。
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        config: PipelineConfig,
        process_index: int,
        process_count: int,
    ) -> None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} 不在 [0, {process_count}) 內")
        self.rows = list(rows)
        self.config = config
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.batch_size = int(config.batch_size)
        self.global_batch = self.batch_size * self.process_count
        self.plan_skips = SkipCounter()
        self.row_bucket = np.full(len(self.rows), -1, np.int64)
        bounds = np.asarray(config.bucket_boundaries)
        for i, r in enumerate(self.rows):
            dur = r.get("duration") if isinstance(r, dict) else None
            key = r.get("id", i) if isinstance(r, dict) else i
            if not isinstance(dur, int | float) or isinstance(dur, bool) or not dur > 0:
                self.plan_skips.add(key, "bad_row", f"全域計畫需要清單 duration，收到 {dur!r}")
                continue
            frames = int(round(float(dur) * SAMPLE_RATE)) // HOP_LENGTH
            if (config.max_seconds and dur > config.max_seconds) or frames > bounds[-1]:
                self.plan_skips.add(key, "too_long", f"{dur:.2f}s")
                continue
            if dur < config.min_seconds:
                self.plan_skips.add(key, "too_short", f"{dur:.3f}s")
                continue
            self.row_bucket[i] = int(bounds[np.searchsorted(bounds, frames)])
        counts = [int((self.row_bucket == b).sum()) for b in bounds]
        gb = self.global_batch
        self.batches_per_epoch = sum(
            c // gb if config.drop_remainder else -(-c // gb) for c in counts
        )
        self._plan_cache: dict[int, list[tuple[int, np.ndarray]]] = {}

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """epoch 的全域批次：[(桶長, 列索引 [B·P]，-1 為填充)]，所有行程相同。"""
        plan = self._plan_cache.get(epoch)
        if plan is not None:
            return plan
        cfg = self.config
        n = len(self.rows)
        order = (
            np.random.default_rng((cfg.seed, int(epoch))).permutation(n)
            if cfg.shuffle
            else np.arange(n)
        )
        open_: dict[int, list[int]] = {int(b): [] for b in cfg.bucket_boundaries}
        plan = []
        for r in order:
            b = int(self.row_bucket[r])
            if b < 0:
                continue
            open_[b].append(int(r))
            if len(open_[b]) == self.global_batch:
                plan.append((b, np.asarray(open_[b])))
                open_[b] = []
        if not cfg.drop_remainder:
            for b, left in open_.items():
                if left:
                    pad = [-1] * (self.global_batch - len(left))
                    plan.append((b, np.asarray(left + pad)))
        if len(plan) != self.batches_per_epoch:
            raise RuntimeError("全域計畫的批次數與預期不符")
        if len(self._plan_cache) > 4:
            self._plan_cache.clear()
        self._plan_cache[epoch] = plan
        return plan

    def __len__(self) -> int:
        per_epoch = self.batches_per_epoch * self.batch_size
        if per_epoch == 0:
            return 0
        if self.config.num_epochs is None:
            return sys.maxsize
        return self.config.num_epochs * per_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        per_epoch = self.batches_per_epoch * self.batch_size
        epoch, rest = divmod(index, per_epoch)
        if self.config.num_epochs is not None and epoch >= self.config.num_epochs:
            raise IndexError(index)
        k, j = divmod(rest, self.batch_size)
        bucket, members = self.epoch_plan(epoch)[k]
        r = int(members[self.process_index * self.batch_size + j])
        return {
            "index": index,
            "epoch": epoch,
            "row_index": r,
            "row": self.rows[r] if r >= 0 else None,
            "bucket": int(bucket),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plan_cache"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"GlobalPlanSource(rows={len(self.rows)}, process={self.process_index}/"
            f"{self.process_count}, batches_per_epoch={self.batches_per_epoch})"
        )


def load_rows(
    manifests: str | os.PathLike | Sequence[Any],
) -> tuple[list[dict[str, Any]], SkipCounter]:
    """讀一份或多份清單（或直接給列）；回傳 (列, 清單層級的略過計數)。

    相對音訊路徑以各自清單所在資料夾為基準（記在列的 `_manifest_dir`）。
    `shards:DIR`（離線鏈的 ArrayRecord 分片）與 `tfds:NAME[/SPLIT]` 也可當成一份清單（見 `source_rows`）。
    """
    skips = SkipCounter()
    if isinstance(manifests, str | os.PathLike):
        manifests = [manifests]
    rows: list[dict[str, Any]] = []
    for m in manifests:
        if isinstance(m, dict):
            rows.append(m)
            continue
        if isinstance(m, str) and m.startswith(SOURCE_PREFIXES):
            rows.extend(source_rows(m))
            continue
        part = read_manifest(m, skips)
        attach_manifest_dir(part, m)
        rows.extend(part)
    return rows, skips


SOURCE_PREFIXES = ("shards:", "tfds:")


def source_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """`shards:DIR` → 分片資料夾的清單列；`tfds:NAME[/SPLIT]`（可加 `@DATA_DIR`）→ tfds 資料目錄中
    該資料集切分的 ArrayRecord 分片。結尾加 `#SPLIT` 時只取該切分（分片依列的 split 欄篩選）。
    列只帶清單欄位，音訊在逐筆轉換時才從分片讀。"""
    if spec.startswith("shards:"):
        directory, _, want = spec.removeprefix("shards:").partition("#")
        rows = shard_rows(directory)
        if not want:
            return rows
        picked = [r for r in rows if str(r.get("split") or "train") == want]
        if not picked:
            raise UserFileError(f"{directory}：分片中沒有 split={want!r} 的列")
        return picked
    spec, _, given = spec.removeprefix("tfds:").partition("#")
    return tfds_rows(spec, given or split)


@dataclass
class Pipeline:
    """建立好的管線：Grain 資料集、清單層級的略過數、來源（含每個 epoch 的順序）。"""

    dataset: grain.IterDataset
    source: EpochShardSource | GlobalPlanSource
    examples: grain.MapDataset
    manifest_skips: SkipCounter
    config: PipelineConfig

    def iterator(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def _ensure_absl_flags_parsed() -> None:
    """Grain 的多行程預取會讀 absl 旗標；不是由 `absl.app.run` 啟動時先標記為已解析（用預設值）。"""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _as_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | os.PathLike):
        return TextTokenizer.from_dir(Path(tokenizer))
    return tokenizer


def build_pipeline(
    manifests: str | os.PathLike | Sequence[Any],
    config: PipelineConfig | Mapping[str, Any],
    tokenizer: Any,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Pipeline:
    """建立完整管線（見模組說明）；`tokenizer` 為 `TextTokenizer` 或模型資料夾路徑。"""
    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig.from_mapping(config)
    cfg.validate()
    pi, pc = _process_defaults(process_index, process_count)
    rows, mskips = load_rows(manifests)
    transform = ExampleTransform(cfg, _as_tokenizer(tokenizer), cfg.bucket_boundaries)
    read = grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
    )
    sync = (pc > 1) if cfg.sync_buckets is None else bool(cfg.sync_buckets)
    if sync:
        source: EpochShardSource | GlobalPlanSource = GlobalPlanSource(rows, cfg, pi, pc)
        mskips.update(source.plan_skips)
        examples = grain.MapDataset.source(source).map(transform)
        collate = PlannedCollate(
            cfg.batch_size, cfg.n_mels, cfg.max_text_tokens, cfg.max_chars_per_token
        )
        ds: grain.IterDataset = examples.batch(cfg.batch_size, batch_fn=collate).to_iter_dataset(
            read
        )
    else:
        source = EpochShardSource(rows, cfg.seed, cfg.shuffle, cfg.num_epochs, pi, pc)
        examples = grain.MapDataset.source(source).map(transform)
        ds = BucketBatchIterDataset(
            examples.to_iter_dataset(read),
            examples,
            boundaries=cfg.bucket_boundaries,
            batch_size=cfg.batch_size,
            n_mels=cfg.n_mels,
            max_text_tokens=cfg.max_text_tokens,
            max_chars_per_token=cfg.max_chars_per_token,
            drop_remainder=cfg.drop_remainder,
        )
    if cfg.workers > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return Pipeline(ds, source, examples, mskips, cfg)


def make_dataset(
    manifests: str | os.PathLike | Sequence[Any],
    config: PipelineConfig | Mapping[str, Any],
    tokenizer: Any,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """回傳批次化的 Grain `IterDataset`（行程預設為 `jax.process_index()／process_count()`）。

    清單層級的略過數（非 UTF-8、壞 JSON 行）掛在回傳物件的 `manifest_skips` 屬性上。
    """
    pipe = build_pipeline(manifests, config, tokenizer, process_index, process_count)
    pipe.dataset.manifest_skips = pipe.manifest_skips
    return pipe.dataset


def make_iterator(
    manifests: str | os.PathLike | Sequence[Any],
    config: PipelineConfig | Mapping[str, Any],
    tokenizer: Any,
    process_index: int | None = None,
    process_count: int | None = None,
    state: Mapping[str, Any] | None = None,
) -> grain.DatasetIterator:
    """建立迭代器；給 `state`（先前 `get_state()` 的結果）時從該處恢復。"""
    it = iter(make_dataset(manifests, config, tokenizer, process_index, process_count))
    if state is not None:
        it.set_state(dict(state))
    return it


def frames_to_seconds(frames: int) -> float:
    """梅爾框數 → 秒。"""
    return frames * HOP_LENGTH / SAMPLE_RATE
