"""訓練任務的介面：模型怎麼建、損失怎麼算、資料從哪來；以及各任務共用的資料迭代器與載入函式。

訓練引擎（`loop.py`）只認得這個介面；各階段各自實作：ASR 連接器在 `tasks/asr.py`，
SFT／雙工／情緒共用的全雙工任務在 `tasks/duplex.py`，`get_task` 在 `tasks/__init__.py`。
損失回傳「總和」與「權重」（例如有效 token 數），引擎在梯度累積與多主機之間
先加總再相除，所以切分方式不同時結果仍一致。
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from speakllm_jax.audio.io import SkipCounter
from speakllm_jax.checkpoints.cosyvoice2_llm import load_cosyvoice2_llm
from speakllm_jax.checkpoints.qwen2_hf import load_qwen2
from speakllm_jax.checkpoints.whisper_hf import load_whisper
from speakllm_jax.data.schema import BatchSchema
from speakllm_jax.text.tokenizer import TextTokenizer

TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """類別裝飾器：以名稱登錄任務，設定檔以 `config.task` 選用。"""

    def wrap(cls: type[Task]) -> type[Task]:
        TASKS[name] = cls
        cls.name = name
        return cls

    return wrap


class DataIterator(abc.ABC):
    """每個程序自己的批次迭代器；狀態可存入檢查點並精確恢復。

    `get_state` 回傳 bytes，與 Grain 的 Orbax 檢查點處理器相容
    （每個程序各寫一個 `process_i-of-n.json`）。
    """

    @abc.abstractmethod
    def __next__(self) -> dict[str, Any]: ...

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    @abc.abstractmethod
    def get_state(self) -> bytes: ...

    @abc.abstractmethod
    def set_state(self, state: bytes) -> None: ...

    def start_prefetch(self) -> None:
        """Grain 檢查點處理器恢復後會呼叫；預設不做事。"""
        return None

    def skip_report(self) -> dict[str, int]:
        """被略過的樣本數（依原因）；沒有時回傳空字典。"""
        return {}


class Task(abc.ABC):
    """一個訓練任務。"""

    name = "task"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """建立隨機初始化的模型（引擎會在 `nnx.eval_shape` 與 jit 之中呼叫）。"""

    @abc.abstractmethod
    def loss(
        self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """回傳 (損失總和, 權重, 其他指標總和)；指標也會除以權重後記錄。"""

    @abc.abstractmethod
    def make_data(self, process_index: int, process_count: int) -> DataIterator:
        """建立本程序的訓練資料迭代器；每批大小為 `train.batch_size // process_count`。"""

    def make_eval_data(self, process_index: int, process_count: int) -> DataIterator | None:
        """評估資料（有限、每次呼叫從頭開始）；沒有評估資料時回傳 None。"""
        return None

    def batch_schema(self) -> BatchSchema | None:
        """批次的綱要（欄位名稱、具名維度、型別、邏輯軸）；沒有時規劃器改由資料取樣推得形狀。"""
        return None

    def batch_sizes(self, frames: int | None = None, text_len: int | None = None) -> dict:
        """綱要具名維度的大小；`frames`／`text_len` 給定時蓋過設定（規劃器用）。"""
        raise NotImplementedError(f"任務 {self.name} 沒有批次綱要")

    def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
        """批次中各欄位的邏輯軸名稱（取自綱要）；未列出的欄位第 0 軸視為 "batch"。"""
        schema = self.batch_schema()
        return {} if schema is None else schema.axes()

    def load_pretrained(self, model: nnx.Module) -> nnx.Module:
        """載入設定中指定的預訓練權重（例如 Whisper / Qwen 的 HF 資料夾）；預設不動。"""
        return model

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """一個批次的 token 數（用於 tokens/s）；預設為批次大小。"""
        first = next(iter(batch.values()))
        return int(first.shape[0])


class GrainBatches(DataIterator):
    """把 Grain 批次迭代器包成引擎用的迭代器，狀態以 JSON bytes 存入檢查點。

    `fields` 給定時只留這些數值欄位（否則整批原樣傳回）。略過數累計在 `skipped`（`SkipCounter`）：
    批次自帶的 `skipped` 欄位會併進來；也可傳入與逐筆轉換共用的計數器。恢復時就地改寫它的計數。
    """

    def __init__(
        self,
        iterator: Any,
        fields: tuple[str, ...] | None = None,
        skipped: SkipCounter | None = None,
    ):
        self.iterator = iterator
        self.fields = fields
        self.skipped = SkipCounter(keep_items=False) if skipped is None else skipped

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        if "skipped" in batch:
            self.skipped.update(batch)
        if self.fields is None:
            return batch
        return {k: np.asarray(batch[k]) for k in self.fields}

    def get_state(self) -> bytes:
        state = {"inner": self.iterator.get_state(), "skipped": self.skipped.as_dict()}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.iterator.set_state(d["inner"])
        self.skipped.load_counts(d.get("skipped", {}))

    def skip_report(self) -> dict[str, int]:
        return self.skipped.as_dict()


def text_tokenizer(cfg: Any) -> Any:
    """任務用的文字分詞器：`model.tokenizer_path`、`model.qwen_path` 或內建的 Qwen 詞表。"""
    if cfg.model.tokenizer_path:
        return TextTokenizer.from_dir(cfg.model.tokenizer_path)
    if cfg.model.qwen_path:
        return TextTokenizer.from_dir(cfg.model.qwen_path)
    return TextTokenizer.default()


def load_pretrained_parts(model: Any, c: Any, model_cfg: Any) -> Any:
    """把設定中指定的官方權重載入 SpeakLLM 的各部分（兩個任務共用）。

    `c.whisper_path`（Whisper HF 資料夾，只取編碼器）、`c.qwen_path`（Qwen2.5 HF 資料夾）、
    `c.talker_path`（CosyVoice2 的 `llm.pt` 或同鍵 safetensors；只在 speech_head="cosyvoice2"）。
    """
    if c.get("whisper_path", ""):
        src = load_whisper(c.whisper_path, dtype=model_cfg.whisper.param_dtype, encoder_only=True)
        nnx.update(model.encoder, nnx.state(getattr(src, "encoder", src)))
    if c.get("qwen_path", ""):
        src = load_qwen2(c.qwen_path, dtype=model_cfg.qwen.param_dtype)
        nnx.update(model.llm, nnx.state(src))
    if c.get("talker_path", ""):
        if model_cfg.speech_head != "cosyvoice2":
            raise ValueError(
                f"model.talker_path 只用於 speech_head='cosyvoice2'，目前為 {model_cfg.speech_head!r}"
            )
        src = load_cosyvoice2_llm(c.talker_path, model_cfg.talker)
        nnx.update(model.speech_head, nnx.state(src))
    return model
