"""命令列共用的錯誤處理與結尾摘要（不匯入 JAX／PyTorch，服務端也可用）。

使用者可修正的錯誤拋出 `UserError`（或其子類別）；各 CLI 以 `run_cli(main)` 執行，錯誤時在
stderr 印一行 `錯誤：…`、結束碼 2、不印 traceback。加 `--debug` 或設 `SPEAKLLM_DEBUG=1` 時另印完整
traceback。`ArgumentParser` 把 argparse 自己的錯誤（缺參數、選項不合）也轉成同樣的一行。
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

DEBUG_ENV = "SPEAKLLM_DEBUG"
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT = 2
PREFIX = "錯誤："


class UserError(Exception):
    """使用者輸入的錯誤（檔案、欄位、參數）；訊息應指出是哪個檔案／欄位與預期的值。"""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UserKeyError(UserError, KeyError):
    """找不到的設定欄位或名稱（同時是 `KeyError`，沿用舊的 except 子句）。"""


class UserValueError(UserError, ValueError):
    """值不合法（同時是 `ValueError`）。"""


class UserFileError(UserError, FileNotFoundError):
    """找不到或不能用的檔案／資料夾（同時是 `FileNotFoundError`）。"""


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """`SPEAKLLM_DEBUG=1` 或命令列（`--` 之前）含 `--debug` 時為 True。"""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[: args.index("--")]
    return DEBUG_FLAG in args


def one_line(message: str) -> str:
    """把多行訊息併成一行（去掉多餘空白）。"""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """以 difflib 找相近的名稱，回傳「；你是不是要 …？」或空字串。"""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f"；你是不是要 {'、'.join(close)}？" if close else ""


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """檔案必須存在，否則拋出 `UserFileError`（訊息含 `what` 與路徑）。"""
    p = Path(path)
    if not p.is_file():
        raise UserFileError(f"{what} 找不到檔案 {p}" + (f"；{hint}" if hint else ""))
    return p


def require_dir(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """資料夾必須存在，否則拋出 `UserFileError`。"""
    p = Path(path)
    if not p.is_dir():
        raise UserFileError(f"{what} 找不到資料夾 {p}" + (f"；{hint}" if hint else ""))
    return p


def empty_manifest(path: str | os.PathLike, detail: str = "") -> UserValueError:
    """「清單沒有任何列」的錯誤（回傳例外物件，由呼叫端拋出）。"""
    return UserValueError(f"{path}：清單沒有任何列" + (f"（{detail}）" if detail else ""))


class ArgumentParser(argparse.ArgumentParser):
    """argparse 的錯誤改為拋出 `UserError`（一行訊息），並自動加上 `--debug`。"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument(
                DEBUG_FLAG,
                action="store_true",
                help=f"出錯時顯示完整 traceback（也可設 {DEBUG_ENV}=1）",
            )

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}（用法見 {self.prog} --help）")


def run_cli(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """執行 CLI 的 `main`，把 `UserError` 轉成一行 `錯誤：…` 與結束碼 2。"""
    debug = debug_enabled(argv)
    try:
        code = main() if argv is None else main(list(argv))
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(PREFIX + one_line(str(err)), file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(PREFIX + "已中斷（Ctrl-C）", file=sys.stderr)
        return 130
    return int(code or 0)


def display_width(text: str) -> int:
    """終端機上的顯示寬度（全形字算 2 欄）。"""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def print_summary(
    title: str, written: Sequence[tuple[str, Any]], next_commands: Sequence[str] = ()
) -> None:
    """印出結尾摘要：寫了哪些東西（標籤：路徑）與下一步的指令。"""
    print(title)
    width = max((display_width(label) for label, _ in written), default=0)
    for label, value in written:
        print(f"  {label}{' ' * (width - display_width(label))}  {value}")
    for i, cmd in enumerate(next_commands):
        print(("下一步：" if i == 0 else "        ") + cmd)
