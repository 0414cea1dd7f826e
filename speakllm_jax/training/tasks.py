"""內建訓練任務。

`asr_connector`（第 0 階段）：Whisper 編碼器 → 連接器 → Qwen2，以轉寫文字的交叉熵
對齊語音與文字；預設只訓練連接器。
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.training.losses import text_loss, weighted_correct
from speakllm_jax.training.task import DataIterator, Task, register_task


class GrainBatches(DataIterator):
    """把 Grain 批次迭代器包成引擎用的迭代器，狀態以 JSON bytes 存入檢查點。

    `fields` 給定時只留這些數值欄位（否則整批原樣傳回）。略過數累計在 `skipped`：批次自帶的
    `skipped` 欄位會加進來；也可傳入與逐筆轉換共用的計數字典。恢復時就地更新該字典。
    """

    def __init__(
        self,
        iterator: Any,
        fields: tuple[str, ...] | None = None,
        skipped: dict[str, int] | None = None,
    ):
        self.iterator = iterator
        self.fields = fields
        self.skipped: dict[str, int] = {} if skipped is None else skipped

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        for k, v in batch.get("skipped", {}).items():
            self.skipped[k] = self.skipped.get(k, 0) + int(v)
        if self.fields is None:
            return batch
        return {k: np.asarray(batch[k]) for k in self.fields}

    def get_state(self) -> bytes:
        return json.dumps({"inner": self.iterator.get_state(), "skipped": self.skipped}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.iterator.set_state(d["inner"])
        self.skipped.clear()
        self.skipped.update(d.get("skipped", {}))

    def skip_report(self) -> dict[str, int]:
        return dict(self.skipped)


def _tokenizer(cfg: Any) -> Any:
    from speakllm_jax.text.tokenizer import TextTokenizer

    if cfg.model.tokenizer_path:
        return TextTokenizer.from_dir(cfg.model.tokenizer_path)
    if cfg.model.qwen_path:
        return TextTokenizer.from_dir(cfg.model.qwen_path)
    return TextTokenizer.default()


def _manifests(cfg: Any, corpora: tuple[str, ...], split: str = "train") -> list[str]:
    given = cfg.data.train_manifests if split == "train" else cfg.data.eval_manifests
    if given:
        paths = [m for m in str(given).split(",") if m]
    else:
        from speakllm_jax.data.demo_data import demo_manifest

        paths = [str(demo_manifest(corpora, cfg.data.demo_dir or None, split=split, seed=cfg.seed))]
    n = int(cfg.data.get("subset", 0))
    return [subset_manifest(paths, n)] if n > 0 else paths


def subset_manifest(paths: list[str], n: int) -> str:
    """取清單的前 n 列寫成新清單（過擬合實驗用）；寫在第一份清單旁。"""
    from pathlib import Path

    from speakllm_jax.data.manifest import read_manifest, resolve_audio, write_manifest

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
        from speakllm_jax.models.speakllm import build_speakllm_config

        self.model_cfg = build_speakllm_config(config.model, config.lora)
        self.tokenizer = _tokenizer(config)
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
        from speakllm_jax.models.speakllm import SpeakLLM

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

    def pipeline_config(self, process_count: int) -> dict[str, Any]:
        c = self.config
        if c.data.bucket_frames:
            bounds = tuple(int(b) for b in c.data.bucket_frames)
        else:
            frames = int(round(float(c.data.max_audio_seconds) * 100))
            frames -= frames % 4
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
        from speakllm_jax.data.pipeline import make_iterator

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
        return GrainBatches(it, self.fields)

    def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
        return {
            "mel": ("batch", None, None),
            "mel_mask": ("batch", None),
            "text_ids": ("batch", None),
            "text_mask": ("batch", None),
        }

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(np.sum(batch["text_mask"]))

    def load_pretrained(self, model: Any) -> Any:
        return load_pretrained_parts(model, self.config.model, self.model_cfg)


def load_pretrained_parts(model: Any, c: Any, model_cfg: Any) -> Any:
    """把設定中指定的官方權重載入 SpeakLLM 的各部分（兩個任務共用）。

    `c.whisper_path`（Whisper HF 資料夾，只取編碼器）、`c.qwen_path`（Qwen2.5 HF 資料夾）、
    `c.talker_path`（CosyVoice2 的 `llm.pt` 或同鍵 safetensors；只在 speech_head="cosyvoice2"）。
    """
    if c.get("whisper_path", ""):
        from speakllm_jax.checkpoints.whisper_hf import load_whisper

        src = load_whisper(c.whisper_path, dtype=model_cfg.whisper.param_dtype, encoder_only=True)
        nnx.update(model.encoder, nnx.state(getattr(src, "encoder", src)))
    if c.get("qwen_path", ""):
        from speakllm_jax.checkpoints.qwen2_hf import load_qwen2

        src = load_qwen2(c.qwen_path, dtype=model_cfg.qwen.param_dtype)
        nnx.update(model.llm, nnx.state(src))
    if c.get("talker_path", ""):
        if model_cfg.speech_head != "cosyvoice2":
            raise ValueError(
                f"model.talker_path 只用於 speech_head='cosyvoice2'，目前為 {model_cfg.speech_head!r}"
            )
        from speakllm_jax.checkpoints.cosyvoice2_llm import load_cosyvoice2_llm

        src = load_cosyvoice2_llm(c.talker_path, model_cfg.talker)
        nnx.update(model.speech_head, nnx.state(src))
    return model


# 登錄全雙工任務（第 1–3 階段）。
from speakllm_jax.training import duplex_task  # noqa: E402,F401
