"""訓練任務的介面：模型怎麼建、損失怎麼算、資料從哪來。

訓練引擎（`loop.py`）只認得這個介面；各階段（ASR 連接器、SFT、雙工、情緒）各自實作。
損失回傳「總和」與「權重」（例如有效 token 數），引擎在梯度累積與多主機之間
先加總再相除，所以切分方式不同時結果仍一致。
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from flax import nnx

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

    def batch_axes(self) -> dict[str, tuple[str | None, ...]]:
        """批次中各欄位的邏輯軸名稱；未列出的欄位第 0 軸視為 "batch"。"""
        return {}

    def load_pretrained(self, model: nnx.Module) -> nnx.Module:
        """載入設定中指定的預訓練權重（例如 Whisper / Qwen 的 HF 資料夾）；預設不動。"""
        return model

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """一個批次的 token 數（用於 tokens/s）；預設為批次大小。"""
        first = next(iter(batch.values()))
        return int(first.shape[0])


def get_task(config: ml_collections.ConfigDict) -> Task:
    """依 `config.task` 建立任務；名稱不明時列出可用任務。"""
    # 匯入以登錄內建任務。
    from speakllm_jax.training import tasks  # noqa: F401

    if config.task not in TASKS:
        raise KeyError(f"未知的任務 {config.task!r}；可用：{sorted(TASKS)}")
    return TASKS[config.task](config)
