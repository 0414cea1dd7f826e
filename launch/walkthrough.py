"""執行 README「走一遍／Walkthrough」一節的指令：從 README 本身解析，兩者不會脫節。

python launch/walkthrough.py                 # 在專案根目錄依序執行（輸出留在 runs/、exported/…）
python launch/walkthrough.py --fresh         # 先把工作樹複製到暫存資料夾（如同剛 clone），在那裡執行
python launch/walkthrough.py --list          # 只列出解析到的指令

README 中兩個標記 `<!-- walkthrough:begin -->`、`<!-- walkthrough:end -->` 之間所有 ```bash 區塊的
每一行都是使用者照打的指令；本腳本把它們交給同一個 `bash`（`set -euo pipefail`），任何一行失敗即
以非零結束碼結束，結束時停掉仍在背景的程序。唯一的改動：訓練那一行（`python launch/train.py`）
後面附加環境變數 `SPEAKLLM_WALKTHROUGH_TRAIN_ARGS` 的內容（CI 用來縮短步數，例如
`--config.train.steps=4`），評估那一行（`python launch/evaluate.py`）附加
`SPEAKLLM_WALKTHROUGH_EVAL_ARGS`（例如 `--max_dialogues 3`）；沒設時一字不改。
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
BEGIN = "<!-- walkthrough:begin -->"
END = "<!-- walkthrough:end -->"
# 指令開頭 → 附加在該行後面的環境變數（只在這裡列出的指令會被改動）。
OVERRIDE_ENV = {
    "python launch/train.py": "SPEAKLLM_WALKTHROUGH_TRAIN_ARGS",
    "python launch/evaluate.py": "SPEAKLLM_WALKTHROUGH_EVAL_ARGS",
}


@dataclass(frozen=True)
class Command:
    """README 中的一條指令：原文（不含行尾註解）、行尾註解與在 README 中的行號。"""

    text: str
    comment: str
    line: int


def split_comment(line: str) -> tuple[str, str]:
    """把一行 shell 拆成指令與行尾註解（引號內的 `#` 與不在空白之後的 `#` 不算註解）。"""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def parse_walkthrough(text: str) -> list[Command]:
    """取出兩個標記之間所有 ```bash 區塊的指令；`\\` 結尾的續行併成一條，空行與整行註解略過。"""
    lines = text.splitlines()
    try:
        start = next(i for i, s in enumerate(lines) if s.strip() == BEGIN)
        stop = next(i for i, s in enumerate(lines) if s.strip() == END and i > start)
    except StopIteration:
        raise ValueError(f"README 缺少標記 {BEGIN} … {END}") from None
    cmds: list[Command] = []
    in_block = False
    pending, pending_line = "", 0
    for i in range(start + 1, stop):
        raw = lines[i]
        s = raw.strip()
        if s.startswith("```"):
            if in_block and pending:
                raise ValueError(f"README 第 {i + 1} 行：續行 `\\` 後區塊就結束了")
            in_block = (not in_block) and s[3:].strip() == "bash"
            continue
        if not in_block:
            continue
        cmd, comment = split_comment(raw)
        if not cmd.strip():
            continue
        if cmd.endswith("\\"):
            pending, pending_line = pending + cmd[:-1].strip() + " ", pending_line or i + 1
            continue
        cmds.append(Command((pending + cmd.strip()).strip(), comment, pending_line or i + 1))
        pending, pending_line = "", 0
    if not cmds:
        raise ValueError("README 的走一遍一節沒有任何 ```bash 指令")
    return cmds


def with_overrides(cmd: str, env: dict[str, str] | os._Environ) -> str:
    """依 `OVERRIDE_ENV` 在指令後附加環境變數給的參數（背景執行的 `&` 之前）。"""
    for prefix, var in OVERRIDE_ENV.items():
        extra = env.get(var, "").strip()
        if extra and cmd.startswith(prefix):
            body, amp = (cmd[:-1].rstrip(), " &") if cmd.endswith("&") else (cmd, "")
            return f"{body} {extra}{amp}"
    return cmd


def to_script(cmds: list[Command], env: dict[str, str] | os._Environ, times: Path) -> str:
    """組成一個 bash 腳本：每條指令前印出原文，之後把耗時（秒）記到 `times`。"""
    out = [
        "set -euo pipefail",
        # 結束（成功或失敗）時停掉仍在背景的程序，例如沒走到停止那一行的伺服器。
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
    ]
    for k, c in enumerate(cmds):
        run = with_overrides(c.text, env)
        out += [
            f"printf '\\n$ %s\\n' {shlex.quote(run)}",
            "_t=$SECONDS",
            run,
            f'echo "{k} $((SECONDS - _t))" >> {shlex.quote(str(times))}',
        ]
    return "\n".join(out) + "\n"


def copy_worktree(dest: Path) -> None:
    """把 git 追蹤與未被忽略的檔案複製到 `dest`（如同剛 clone 的樣子，不帶任何輸出資料夾）。"""
    res = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, res.stdout.decode("utf-8").split("\0")):
        src = REPO_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--readme", default=str(README), help="從哪個 README 解析（預設專案的 README.md）"
    )
    p.add_argument("--list", action="store_true", help="只列出指令，不執行")
    p.add_argument("--fresh", action="store_true", help="在暫存資料夾的工作樹副本中執行")
    p.add_argument("--keep", action="store_true", help="--fresh 時成功也保留暫存資料夾")
    p.add_argument("--cwd", default="", help="在這個資料夾執行（預設專案根目錄；不複製）")
    a = p.parse_args(argv)
    cmds = parse_walkthrough(Path(a.readme).read_text("utf-8"))
    if a.list:
        for c in cmds:
            print(with_overrides(c.text, os.environ))
        return 0
    cwd = Path(a.cwd) if a.cwd else REPO_ROOT
    if a.fresh:
        cwd = Path(tempfile.mkdtemp(prefix="speakllm-walkthrough-"))
        copy_worktree(cwd)
        print(f"工作樹副本：{cwd}")
    times = cwd / ".walkthrough_times"
    times.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc = subprocess.run(["bash", "-c", to_script(cmds, os.environ, times)], cwd=cwd).returncode
    took = dict(line.split() for line in times.read_text().splitlines()) if times.exists() else {}
    times.unlink(missing_ok=True)
    print("\n== 走一遍：每步耗時")
    for k, c in enumerate(cmds):
        sec = took.get(str(k))
        print(f"{sec + ' 秒' if sec else '（未執行）':>10}  {with_overrides(c.text, os.environ)}")
    print(f"共 {time.perf_counter() - t0:.0f} 秒")
    if rc:
        bad = cmds[min(len(took), len(cmds) - 1)]
        print(
            f"錯誤：README 第 {bad.line} 行的指令失敗（結束碼 {rc}）：{bad.text}", file=sys.stderr
        )
        return rc
    if a.fresh and not a.keep:
        shutil.rmtree(cwd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
