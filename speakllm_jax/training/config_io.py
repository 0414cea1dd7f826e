"""訓練設定的解析：以名稱或路徑選擇階段設定檔、套用命令列覆寫、寫出解析後的設定。

`--config phase2` 對應 `configs/phase2_duplex.py`；也可直接給檔案路徑。覆寫寫成
`--config.optim.lr=3e-4`，值依原欄位型別轉換（布林、整數、浮點、元組、字串）。
`preset` 的覆寫最先套用，因為它決定整個模型區塊的預設尺寸。
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from speakllm_jax.cli import UserFileError, UserKeyError, UserValueError, suggest

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PHASE_FILES = {
    "phase0": "phase0_connector.py",
    "phase1": "phase1_sft.py",
    "phase2": "phase2_duplex.py",
    "phase3": "phase3_emotion.py",
}


def config_path(name: str) -> Path:
    """把 `phase2`、`phase2_duplex` 或檔案路徑轉成設定檔路徑；找不到時列出可用名稱。"""
    p = Path(name)
    if p.suffix == ".py" and p.exists():
        return p
    if name in PHASE_FILES:
        return CONFIG_DIR / PHASE_FILES[name]
    candidate = CONFIG_DIR / f"{name}.py"
    if candidate.exists():
        return candidate
    known = sorted(PHASE_FILES) + sorted(
        f.stem for f in CONFIG_DIR.glob("*.py") if f.stem[0] != "_"
    )
    raise UserFileError(
        f"--config {name}：找不到這個設定{suggest(name, known)}；可用名稱：{sorted(PHASE_FILES)}，"
        "或給 configs/ 下的 .py 路徑"
    )


def _load_module(path: Path) -> Any:
    # 設定檔以 `from configs.base import ...` 互相引用：確保專案根目錄在匯入路徑上。
    root = str(CONFIG_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_speakllm_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"無法載入設定檔 {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserValueError(f"--config {path}：設定檔沒有 get_config()")
    return module


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
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """把 `--config.a.b=v` 或 `--config.a.b v` 解析成 (a.b, v) 串列。"""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise UserValueError(f"無法辨識的參數 {arg!r}；覆寫請寫成 --config.欄位=值")
        body = arg[len("--config.") :]
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


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """套用一個覆寫；路徑不存在時報錯並列出該層可用欄位。"""
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
    leaf = parts[-1]
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise UserKeyError(f"--config.{key} 是一個區塊，請覆寫其中的欄位")
    with node.unlocked():
        node[leaf] = _coerce(text, old, key)


def load_config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """載入階段設定並套用覆寫。"""
    pairs = parse_overrides(list(overrides))
    module = _load_module(config_path(name))
    preset = [v for k, v in pairs if k == "preset"]
    params = inspect.signature(module.get_config).parameters
    if preset and "preset" in params:
        try:
            cfg = module.get_config(preset=preset[-1])
        except ValueError as err:
            raise UserValueError(f"--config.preset={preset[-1]}：{err}") from err
    else:
        cfg = module.get_config()
    for key, value in pairs:
        if key == "preset" and "preset" in params:
            continue
        apply_override(cfg, key, value)
    return cfg


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """轉成可寫入 JSON 的普通字典（元組轉串列）。"""
    return json.loads(cfg.to_json())


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

    if "turn_rule" in cfg:
        from speakllm_jax.turn_policy import TurnRule

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
    for key in ("train_manifests", "eval_manifests"):
        for item in str(cfg.data.get(key, "")).split(","):
            if local(item.strip()) and not Path(item.strip()).is_file():
                raise UserFileError(f"--config.data.{key}：清單不存在：{item.strip()}")
