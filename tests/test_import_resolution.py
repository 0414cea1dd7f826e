"""每一個匯入敘述都解析得到：程式碼資料夾中每個 `import M`／`from M import N`（模組層級、函式內、
`if TYPE_CHECKING:` 內都算）的 M 匯入得了、N 在 M 中存在（屬性或子模組）。

重構把名稱搬走而有一處函式內匯入沒跟著改時，只有真的走到那一行才會壞；這個測試在預設測試集裡
就抓到。唯一可以略過的是沒有安裝的第三方選用套件，且要在 `NOT_INSTALLED` 記下理由。
不屬於套件的腳本資料夾（`launch/`、`data/`、`benchmarks/`）以 `python 資料夾/x.py` 執行，
腳本所在資料夾在 `sys.path` 最前面，所以其中的 `import 同資料夾的檔名` 解析為該檔。
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("speakllm_jax", "export", "launch", "data", "benchmarks", "examples", "configs")
# 沒有安裝時可略過的第三方套件（頂層名稱）→ 理由。
NOT_INSTALLED = {
    "wandb": "選用的 Weights & Biases 紀錄（logging.wandb=true），requirements.txt 不裝；"
    "沒有安裝時 metrics_log 印一行提示後略過",
}


@dataclass(frozen=True)
class ImportStmt:
    """一個匯入敘述中的一項：`from module import name`（`import module` 時 name 為 None）。"""

    path: Path
    line: int
    module: str
    name: str | None

    def where(self) -> str:
        what = f"from {self.module} import {self.name}" if self.name else f"import {self.module}"
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{where}:{self.line}: {what}"


def _package_of(path: Path) -> str | None:
    """檔案所屬套件的點分名稱（所在資料夾沒有 `__init__.py` 時為 None：是腳本）。"""
    if not (path.parent / "__init__.py").is_file():
        return None
    return ".".join(path.parent.relative_to(ROOT).parts)


def _script_sibling(path: Path, module: str) -> str:
    """腳本資料夾中 `import 同資料夾的檔名` → 以專案根目錄為準的模組名稱；其餘原樣。"""
    if _package_of(path) is not None:
        return module
    top = module.split(".")[0]
    if (path.parent / f"{top}.py").is_file() or (path.parent / top / "__init__.py").is_file():
        return ".".join((*path.parent.relative_to(ROOT).parts, module))
    return module


def import_statements(path: Path) -> list[ImportStmt]:
    """一個檔案中所有的匯入項（含函式內與 `if TYPE_CHECKING:` 內）。"""
    out: list[ImportStmt] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(ImportStmt(path, node.lineno, _script_sibling(path, alias.name), None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = (_package_of(path) or "").split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = _script_sibling(path, node.module or "")
            for alias in node.names:
                if alias.name != "*":
                    out.append(ImportStmt(path, node.lineno, module, alias.name))
    return sorted(out, key=lambda s: s.line)


def _is_internal(module: str) -> bool:
    return module.split(".")[0] in SCANNED


def check(stmt: ImportStmt) -> tuple[str, str] | None:
    """None：解析得到。否則 ("skip", 理由) 或 ("error", 說明)。"""
    try:
        mod = importlib.import_module(stmt.module)
    except ModuleNotFoundError as err:
        missing = (err.name or stmt.module).split(".")[0]
        if not _is_internal(missing) and importlib.util.find_spec(missing) is None:
            if missing in NOT_INSTALLED:
                return "skip", f"{missing} 未安裝：{NOT_INSTALLED[missing]}"
            return "error", f"第三方套件 {missing} 未安裝（加進 requirements.txt 或 NOT_INSTALLED）"
        return "error", f"找不到模組 {err.name}"
    except Exception as err:  # noqa: BLE001  匯入時的任何錯誤都要指名是哪一行
        return "error", f"匯入 {stmt.module} 失敗：{type(err).__name__}: {err}"
    if stmt.name is None or hasattr(mod, stmt.name):
        return None
    sub = f"{stmt.module}.{stmt.name}"
    try:
        is_submodule = importlib.util.find_spec(sub) is not None
    except ImportError:  # M 不是套件：沒有子模組
        is_submodule = False
    if is_submodule:
        return check(ImportStmt(stmt.path, stmt.line, sub, None))
    return "error", f"{stmt.module} 中沒有 {stmt.name}"


def unresolved(paths: list[Path]) -> tuple[list[str], list[str]]:
    """(解析不到的匯入, 略過的匯入與理由)。"""
    errors: list[str] = []
    skipped: list[str] = []
    seen: dict[tuple[str, str | None], tuple[str, str] | None] = {}
    for path in paths:
        for stmt in import_statements(path):
            key = (stmt.module, stmt.name)
            if key not in seen:
                seen[key] = check(stmt)
            result = seen[key]
            if result is not None:
                (skipped if result[0] == "skip" else errors).append(
                    f"{stmt.where()}（{result[1]}）"
                )
    return errors, skipped


def _scanned_files() -> list[Path]:
    return [p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))]


def test_every_import_in_the_code_resolves():
    files = _scanned_files()
    assert len(files) > 100
    errors, skipped = unresolved(files)
    assert not errors, "解析不到的匯入：\n" + "\n".join(errors)
    # 略過的只能是 NOT_INSTALLED 記了理由的套件；記下的套件已沒有人匯入時，請刪掉那一項。
    used = {s.module.split(".")[0] for p in files for s in import_statements(p)}
    assert set(NOT_INSTALLED) <= used, f"請從 NOT_INSTALLED 刪掉：{set(NOT_INSTALLED) - used}"
    assert all(s.split("（", 1)[1].split(" ")[0] in NOT_INSTALLED for s in skipped), skipped


def test_checker_catches_a_moved_name_in_a_function_local_import(tmp_path):
    """檢查本身：上一輪重構後 `benchmarks/bench_turn_recipe.py` 函式內還從搬走前的模組匯入
    `make_demo_voila_tokenizer`；同類錯誤（模組不在、名稱不在、子模組不在）都被指名，
    腳本資料夾的同層匯入、相對匯入與未安裝的選用套件不算錯。"""
    script = tmp_path / "script.py"
    script.write_text(
        "import json\n"
        "from speakllm_jax.audio.constants import SAMPLE_RATE\n\n\n"
        "def main():\n"
        "    from speakllm_jax.data.speech_tokens import make_demo_voila_tokenizer\n"
        "    from export.tokenizers.voila import make_demo_voila_tokenizer as ok\n"
        "    from speakllm_jax.audio.constants import NOT_A_CONSTANT\n"
        "    from speakllm_jax.audio import no_such_module\n"
        "    import speakllm_jax.audio.features\n"
        "    import wandb\n"
        "    return json, SAMPLE_RATE, ok\n",
        encoding="utf-8",
    )
    errors, skipped = unresolved([script])
    assert [e.split("（")[0].split(":", 1)[1] for e in errors] == [
        "6: from speakllm_jax.data.speech_tokens import make_demo_voila_tokenizer",
        "8: from speakllm_jax.audio.constants import NOT_A_CONSTANT",
        "9: from speakllm_jax.audio import no_such_module",
    ]
    if importlib.util.find_spec("wandb") is None:
        assert len(skipped) == 1 and "wandb" in skipped[0]


def test_script_sibling_and_relative_imports_are_resolved_like_python():
    """`benchmarks/bench_serving.py` 的 `import paper_estimate` 指向同資料夾的檔案；
    套件內的相對匯入以所屬套件為準。"""
    bench = ROOT / "benchmarks" / "bench_serving.py"
    assert _script_sibling(bench, "paper_estimate") == "benchmarks.paper_estimate"
    assert _script_sibling(bench, "numpy") == "numpy"
    inside = ROOT / "speakllm_jax" / "audio" / "vad.py"
    assert _script_sibling(inside, "constants") == "constants"
    assert _package_of(inside) == "speakllm_jax.audio"
