"""設定的載入：以 `ml_collections.config_flags`（big_vision 的寫法）讀階段設定檔並套用命令列覆寫。

`--config configs/phase2_duplex.py:preset=full`：冒號後的字串交給設定檔的 `get_config(arg)`；
`--config phase2`、`--config phase2:preset=full` 是短名稱（對應 `configs/` 下的檔案）；
`--config.optim.lr=3e-4`（或 `--config.optim.lr 3e-4`）覆寫欄位。`--config.preset=full` 沿用
舊寫法，等同 `:preset=full`（預設決定整個模型區塊的尺寸，所以在建立設定時就要知道）。

覆寫先依原欄位型別檢查（錯誤為一行、指出欄位與型別，未知欄位附相近名稱），再交給
`config_flags` 套用。本模組不匯入 JAX，訓練、規劃器與服務端共用。
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from speakllm_jax.cli import UserFileError, UserKeyError, UserValueError, suggest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PHASE_FILES = {
    "phase0": "phase0_connector.py",
    "phase1": "phase1_sft.py",
    "phase2": "phase2_duplex.py",
    "phase3": "phase3_emotion.py",
}
_PREFIX = "--config."


def config_path(name: str) -> Path:
    """把 `phase2`、`phase2_duplex` 或檔案路徑轉成設定檔路徑；找不到時列出可用名稱。"""
    p = Path(name)
    if p.suffix == ".py" and p.is_file():
        return p
    if name in PHASE_FILES:
        return CONFIG_DIR / PHASE_FILES[name]
    candidate = CONFIG_DIR / f"{name}.py"
    if candidate.is_file():
        return candidate
    known = sorted(PHASE_FILES) + sorted(
        f.stem for f in CONFIG_DIR.glob("*.py") if f.stem[0] != "_"
    )
    raise UserFileError(
        f"--config {name}：找不到這個設定{suggest(name, known)}；可用名稱：{sorted(PHASE_FILES)}，"
        "或給 configs/ 下的 .py 路徑"
    )


def _coerce(text: str, old: Any, key: str) -> Any:
    """依舊值的型別把命令列字串轉成新值；轉不了時拋出指出欄位與型別的 `UserValueError`。"""

    def bad(kind: str) -> UserValueError:
        return UserValueError(f"--config.{key} 需要 {kind}，收到 {text!r}")

    if isinstance(old, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad("bool（布林值 true/false）")
    if isinstance(old, int):
        try:
            value = float(text) if "e" in text.lower() else int(text)
        except ValueError:
            raise bad("int") from None
        if isinstance(value, float) and not value.is_integer():
            raise bad("int")
        return int(value)
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise bad("float") from None
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(s for s in text.split(",") if s)
        if isinstance(value, (str, int, float)):
            value = (value,)
        return tuple(value)
    return text


def _as_flag_text(value: Any) -> str:
    """已檢查的值 → `config_flags` 的解析器接受的字串（布林 true/false、元組以 repr）。"""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return repr(value)
    return str(value)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """把 `--config.a.b=v` 或 `--config.a.b v` 解析成 (a.b, v) 串列。"""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(_PREFIX):
            raise UserValueError(f"無法辨識的參數 {arg!r}；覆寫請寫成 --config.欄位=值")
        body = arg[len(_PREFIX) :]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserValueError(f"{arg} 缺少值")
            key, value = body, args[i + 1]
            i += 2
        out.append((key, value))
    return out


def check_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> str:
    """檢查一個覆寫的路徑與值，回傳交給 `config_flags` 的字串；錯誤時列出該層可用欄位。"""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserKeyError(f"--config.{key}：{'.'.join(parts[:i])} 不是區塊，沒有子欄位")
        if part not in node:
            prefix = ".".join(parts[:i])
            names = [f"{prefix}.{k}" if prefix else k for k in node.keys()]
            raise UserKeyError(
                f"--config.{key}：設定中沒有 {'.'.join(parts[: i + 1])}"
                f"{suggest('.'.join(parts[: i + 1]), names)}；可用：{sorted(node.keys())}"
            )
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
        raise UserKeyError(f"--config.{key} 是一個區塊，請覆寫其中的欄位")
    return _as_flag_text(_coerce(text, old, key))


def _split_name(name: str) -> tuple[str, str | None]:
    """`phase2:preset=full` → (`phase2`, `preset=full`)；沒有冒號時引數為 None。"""
    base, sep, arg = name.partition(":")
    return base, (arg if sep else None)


def _parse_flags(argv: list[str]) -> ml_collections.ConfigDict:
    """以一份私有的 `FlagValues` 執行 `config_flags`（不碰全域 FLAGS，可重複呼叫）。"""
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    rest = values(argv, known_only=False)
    if len(rest) > 1:
        raise UserValueError(f"無法辨識的參數 {rest[1]!r}；覆寫請寫成 --config.欄位=值")
    return holder.value


def load_config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """載入設定（`name` 為短名稱或路徑，可帶 `:引數`）並套用 `--config.欄位=值` 覆寫。"""
    pairs = parse_overrides(list(overrides))
    base, arg = _split_name(name)
    path = config_path(base)
    shown = f"--config {name}"
    presets = [v for k, v in pairs if k == "preset"]
    if presets:
        # 舊寫法 `--config.preset=X` 併入設定檔引數（晚給的優先）。
        arg = f"{arg},preset={presets[-1]}" if arg else f"preset={presets[-1]}"
        shown = f"--config.preset={presets[-1]}"
        pairs = [(k, v) for k, v in pairs if k != "preset"]
    target = f"{path}:{arg}" if arg is not None else str(path)
    # 設定檔以 `from configs.base import ...` 互相引用：確保專案根目錄在匯入路徑上。
    root = str(CONFIG_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    argv = ["speakllm", f"--config={target}"]
    try:
        cfg = _parse_flags(argv)
        checked = [f"{_PREFIX}{k}={check_override(cfg, k, v)}" for k, v in pairs]
        return _parse_flags(argv + checked) if checked else cfg
    except flags.Error as err:
        raise UserValueError(f"{shown}：{_root_message(err)}") from err


def _root_message(err: BaseException) -> str:
    """`config_flags` 把設定檔的 ValueError 包了兩層：取最裡面那個例外的訊息（第一行）。"""
    inner: BaseException = err
    while (nxt := inner.__cause__ or inner.__context__) is not None:
        inner = nxt
    return str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """轉成可寫入 JSON 的普通字典（元組轉串列）。"""
    return json.loads(cfg.to_json())
