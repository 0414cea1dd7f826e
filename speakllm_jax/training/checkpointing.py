"""Orbax 檢查點：訓練狀態、資料迭代器狀態與設定一起存，能精確恢復。

Orbax 先寫到暫存資料夾、完成後才改名，所以寫到一半（被殺掉）的檢查點不會被
`latest_step` 看到，也就不會被恢復。資料迭代器以 Grain 的檢查點處理器存，
每個程序各一個 `process_i-of-n.json`。
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from speakllm_jax.training.tasks.base import DataIterator


class Checkpointer:
    """`CheckpointManager` 的薄包裝，固定了本專案存的三樣東西。"""

    def __init__(
        self,
        directory: str | Path,
        every_steps: int = 100,
        max_to_keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
    ):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every_steps), 1),
            max_to_keep=int(max_to_keep) if max_to_keep else None,
            keep_period=int(keep_period) if keep_period else None,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """最新且已完整寫入的步數；沒有時為 None。"""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        data: DataIterator | None,
        config: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """存一個檢查點（非同步時立即返回）；回傳是否真的存了。"""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config),
        }
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, step: int, abstract_state: Any, data: DataIterator | None
    ) -> tuple[Any, dict[str, Any]]:
        """依抽象狀態（含分片）恢復；資料迭代器就地恢復。回傳 (狀態, 設定)。"""
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "config": ocp.args.JsonRestore(),
        }
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["config"]

    def restore_params(self, step: int | None = None) -> dict[str, Any]:
        """只讀出參數（可訓練與凍結）為巢狀字典，供下一階段初始化。"""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} 中沒有完整的檢查點")
        # 以本機單一裝置為目標恢復，與存檔時的網格／程序數無關。
        # 直接用 state 項目的處理器讀：步驟層級的 `_CHECKPOINT_METADATA` 在上一層資料夾，
        # 以 `StandardCheckpointer` 開項目資料夾會找不到它而警告（absl「Metadata file does not exist」）。
        path = self.directory / str(step) / "state"
        handler = ocp.StandardCheckpointHandler()
        tree = handler.metadata(path)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree
        )
        state = handler.restore(path, args=ocp.args.StandardRestore(target))
        handler.close()
        return {"params": state["params"], "frozen": state["frozen"]}

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
    else:
        out[prefix] = tree
    return out


def overlay_params(target: Any, source: dict[str, Any]) -> tuple[Any, list[str], list[str]]:
    """把前一階段的參數依路徑與形狀覆蓋到新狀態（純 `nnx.State`）。

    回傳 (新狀態, 已覆蓋的路徑, 形狀不符而略過的路徑)。新模型多出的參數保持初始化值。
    """
    src: dict[tuple, Any] = {}
    for part in ("params", "frozen"):
        src.update(_flatten(source.get(part, {})))
    copied: list[str] = []
    mismatched: list[str] = []

    def one(path: tuple, leaf: Any) -> Any:
        key = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        if key in src:
            value = src[key]
            if tuple(np.shape(value)) == tuple(leaf.shape):
                copied.append("/".join(key))
                arr = np.asarray(value).astype(leaf.dtype)
                sharding = getattr(leaf, "sharding", None)
                return jax.device_put(arr, sharding) if sharding is not None else arr
            mismatched.append(f"{'/'.join(key)} {np.shape(value)}→{leaf.shape}")
        return leaf

    new = jax.tree_util.tree_map_with_path(one, target)
    return new, copied, mismatched
