"""訓練執行資料夾與設定的檢查：寫出解析後的設定、找檢查點、訓練前檢查路徑與網格。

設定的載入與覆寫在 `speakllm_jax.config`（`ml_collections.config_flags`）；`load_config` 在此仍可
匯入（舊的匯入路徑），新程式請直接用 `speakllm_jax.config`。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from speakllm_jax.cli import UserFileError, UserValueError
from speakllm_jax.config import config_to_dict
from speakllm_jax.config import (
    load_config as load_config,  # 舊的匯入路徑（main 上的 serving/web.py）
)
from speakllm_jax.models.axis_rules import DEFAULT_RULES, rules_from_config
from speakllm_jax.turn_policy import TurnRule


def write_resolved(cfg: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """把解析後的設定寫到執行資料夾的 `config.json`。"""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config_to_dict(cfg), indent=2, ensure_ascii=False) + "\n")
    return path


def saved_steps(workdir: str | Path) -> list[int]:
    """`workdir/checkpoints/` 下已完成的步數（資料夾名為數字；不匯入 Orbax）。"""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.is_dir() and d.name.isdigit())


def require_run_dir(workdir: str | Path, step: int | None = None, flag: str = "--workdir") -> Path:
    """訓練執行資料夾必須有 `config.json` 與（指定的）檢查點，否則拋出 `UserFileError`。

    在建立模型之前檢查，錯誤不必等 JAX 編譯；`flag` 是錯誤訊息中指出的命令列旗標。
    """
    d = Path(workdir)
    hint = "先以 python launch/train.py --workdir 同一資料夾 訓練"
    if not d.is_dir():
        raise UserFileError(f"{flag} {d}：資料夾不存在；{hint}")
    if not (d / "config.json").is_file():
        raise UserFileError(f"{flag} {d}：不是訓練執行資料夾（缺少 config.json）；{hint}")
    steps = saved_steps(d)
    if not steps:
        raise UserFileError(f"{flag} {d}：{d / 'checkpoints'} 中沒有完整的檢查點；{hint}")
    if step is not None and int(step) not in steps:
        raise UserFileError(f"--step {step}：{d / 'checkpoints'} 沒有這一步；可用：{steps}")
    return d


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
    """訓練開始前（匯入 JAX 之前）檢查網格大小與本機輸入路徑，錯誤時拋出 `UserError`。

    路徑為初始化檢查點、預訓練權重與清單；含 `://` 的路徑（例如 gs://）不檢查。
    """
    for axis, size in cfg.get("mesh", {}).items():
        if int(size) < 1 and int(size) != -1:
            raise UserValueError(
                f"--config.mesh.{axis}={size}：網格軸的大小必須 ≥ 1（-1 表示用剩下的裝置）"
            )

    try:
        rules_from_config(cfg.get("logical_axis_rules", DEFAULT_RULES))
    except (TypeError, ValueError) as err:
        raise UserValueError(f"--config.logical_axis_rules：{err}") from None
    if "turn_rule" in cfg:
        try:
            TurnRule.from_dict(cfg.turn_rule, "--config.turn_rule")
        except (TypeError, ValueError) as err:
            raise UserValueError(str(err)) from err

    def local(value: Any) -> bool:
        return bool(value) and "://" not in str(value)

    init = cfg.checkpoint.get("init_from", "")
    if local(init):
        require_run_dir(init, flag="--config.checkpoint.init_from")
    for key in ("whisper_path", "qwen_path", "talker_path"):
        value = cfg.model.get(key, "")
        if local(value) and not Path(value).exists():
            raise UserFileError(
                f"--config.model.{key}={value}：路徑不存在（需要本機的官方權重資料夾）"
            )
    talker = str(cfg.model.get("talker_path", ""))
    if local(talker) and Path(talker).suffix in (".pt", ".pth", ".bin"):
        raise UserValueError(
            f"--config.model.talker_path={talker}：JAX 訓練不讀 PyTorch pickle，請先轉成 safetensors："
            f"python -m export.convert_llm_pt --input {talker}"
        )
    for key in ("train_manifests", "eval_manifests"):
        for item in str(cfg.data.get(key, "")).split(","):
            if local(item.strip()) and not Path(item.strip()).is_file():
                raise UserFileError(f"--config.data.{key}：清單不存在：{item.strip()}")
