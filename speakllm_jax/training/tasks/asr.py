"""`asr_connector`（第 0 階段）：Whisper 編碼器 → 連接器 → Qwen2，以轉寫文字的交叉熵
對齊語音與文字；預設只訓練連接器。`duplex`（第 1–3 階段）在 `tasks/duplex.py`。
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.cli import UserValueError
from speakllm_jax.data.batching import ASR_BATCH
from speakllm_jax.data.demo_data import demo_manifest
from speakllm_jax.data.manifest import read_manifest, resolve_audio, write_manifest
from speakllm_jax.data.pipeline import make_iterator
from speakllm_jax.data.schema import BatchSchema
from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config
from speakllm_jax.training.losses import text_loss, weighted_correct
from speakllm_jax.training.tasks.base import (
    DataIterator,
    GrainBatches,
    Task,
    load_pretrained_parts,
    register_task,
    text_tokenizer,
)


def _manifests(cfg: Any, corpora: tuple[str, ...], split: str = "train") -> list[str]:
    source = str(cfg.data.get("source", "jsonl") or "jsonl")
    if source != "jsonl":
        if not source.startswith(("shards:", "tfds:")):
            raise UserValueError(
                f"--config.data.source 必須是 jsonl、shards:DIR 或 tfds:NAME，收到 {source!r}"
            )
        # 訓練讀 train 切分，評估讀 test 切分（分片依各列的 split 欄篩選，tfds 依切分名稱）。
        return [f"{source}#{split}"]
    given = cfg.data.train_manifests if split == "train" else cfg.data.eval_manifests
    if given:
        paths = [m for m in str(given).split(",") if m]
    else:
        paths = [str(demo_manifest(corpora, cfg.data.demo_dir or None, split=split, seed=cfg.seed))]
    n = int(cfg.data.get("subset", 0))
    return [subset_manifest(paths, n)] if n > 0 else paths


def subset_manifest(paths: list[str], n: int) -> str:
    """取清單的前 n 列寫成新清單（過擬合實驗用）；寫在第一份清單旁。"""
    rows: list[dict] = []
    for p in paths:
        for r in read_manifest(p):
            # 改成絕對路徑，新清單放在哪裡都能找到音訊。
            rows.append(dict(r, audio=str(resolve_audio(r, Path(p).resolve().parent))))
    out = Path(paths[0]).with_suffix(f".subset{n}.jsonl")
    write_manifest(out, rows[:n])
    return str(out)


@register_task("asr_connector")
class AsrConnectorTask(Task):
    """第 0 階段：語音 → 文字（ASR），只在文字位置計算交叉熵。"""

    fields = ("mel", "mel_mask", "text_ids", "text_mask")

    def __init__(self, config: Any):
        super().__init__(config)
        self.model_cfg = build_speakllm_config(config.model, config.lora)
        self.tokenizer = text_tokenizer(config)
        if self.tokenizer.vocab_size > self.model_cfg.qwen.vocab_size:
            raise ValueError(
                f"分詞器詞表 {self.tokenizer.vocab_size} 大於模型詞表 {self.model_cfg.qwen.vocab_size}"
            )
        self.prefix = np.asarray(
            [
                self.tokenizer.special_id("<|task_asr|>"),
                self.tokenizer.special_id("<|audio_start|>"),
            ],
            np.int32,
        )
        self.suffix = np.asarray([self.tokenizer.special_id("<|audio_end|>")], np.int32)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return SpeakLLM(self.model_cfg, rngs=rngs)

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple:
        del rng
        logits = model.asr_logits(
            batch["mel"],
            batch["mel_mask"],
            jnp.asarray(self.prefix),
            jnp.asarray(self.suffix),
            batch["text_ids"],
            batch["text_mask"],
        )
        total, weight = text_loss(logits, batch["text_ids"], batch["text_mask"])
        correct = weighted_correct(logits, batch["text_ids"], batch["text_mask"])
        return total, weight, {"token_accuracy": correct}

    def max_mel_frames(self) -> int:
        """最長的梅爾框數：`data.max_audio_seconds × 100`，向下取到 4 的倍數。"""
        frames = int(round(float(self.config.data.max_audio_seconds) * 100))
        return frames - frames % 4

    def pipeline_config(self, process_count: int) -> dict[str, Any]:
        c = self.config
        if c.data.bucket_frames:
            bounds = tuple(int(b) for b in c.data.bucket_frames)
        else:
            frames = self.max_mel_frames()
            bounds = tuple(b for b in (400, 800, 1200, 2000, 3000) if b < frames) + (frames,)
        return dict(
            batch_size=int(c.train.batch_size) // process_count,
            bucket_boundaries=bounds,
            seed=int(c.seed),
            n_mels=int(c.data.n_mels),
            max_seconds=float(c.data.max_audio_seconds),
            max_text_tokens=int(c.data.max_text_tokens),
            codeswitch_prob=float(c.data.codeswitch_prob),
            workers=int(c.data.workers),
        )

    def make_data(self, process_index: int, process_count: int) -> DataIterator:
        return self._data("train", process_index, process_count)

    def make_eval_data(self, process_index: int, process_count: int) -> DataIterator | None:
        return self._data("test", process_index, process_count)

    def _data(self, split: str, process_index: int, process_count: int) -> DataIterator:
        corpora = tuple(s for s in str(self.config.data.demo_corpora).split(",") if s)
        pipe = self.pipeline_config(process_count)
        if split != "train":
            # 評估：不洗牌、只走一遍，最後不足一批時補齊（被遮掉的列不計入損失）。
            pipe.update(shuffle=False, num_epochs=1, drop_remainder=False)
        it = make_iterator(
            _manifests(self.config, corpora, split),
            pipe,
            self.tokenizer,
            process_index=process_index,
            process_count=process_count,
        )
        return GrainBatches(it, self.batch_schema().names)

    def batch_schema(self) -> BatchSchema:
        return ASR_BATCH.subset(self.fields)

    def batch_sizes(self, frames: int | None = None, text_len: int | None = None) -> dict:
        c = self.config
        return {
            "n_mels": int(c.data.n_mels),
            "mel_frames": int(frames if frames is not None else self.max_mel_frames()),
            "text_len": int(text_len if text_len is not None else c.data.max_text_tokens),
            "chars": int(c.model.max_chars_per_token),
        }

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(np.sum(batch["text_mask"]))

    def load_pretrained(self, model: Any) -> Any:
        return load_pretrained_parts(model, self.config.model, self.model_cfg)


__all__ = ["AsrConnectorTask", "subset_manifest"]
