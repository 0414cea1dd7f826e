"""匯入層級：由 AST 讀出每個模組的匯入（模組層級與函式內），檢查只往下指、沒有環。

層級（由下而上）：`base`（`speakllm_jax` 套件本身、`labels`、`cpu_simulation`、`config`）→ `text` → `audio`
→ `data`；`models`（不匯入 data／checkpoints／training／eval）→ `checkpoints`（只到 models）→
`configs` → `training` → `eval` → 入口（`launch/`、`data/` 的 CLI、`benchmarks/`、`export/`）。
`export/` 不匯入 eval；`export/serving/` 只用 base／text／audio／data 與 export，且模組層級
可達的模組都不匯入 jax／flax。`speakllm_jax/` 的 JAX 路徑不在模組層級匯入 torch。

尚未修好的違規列在下面有註解的允許清單；清單中的項目不再發生時測試也會失敗（請刪掉該行）。
`speakllm_jax/`、`export/`、`launch/`、`benchmarks/` 與 `configs/models.py` 的函式內匯入都要有
一行註解說明理由（上一行或行尾；同一組共用一行）。
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("speakllm_jax", "configs", "launch", "data", "export", "benchmarks")

# 層級表（唯一的一份）：模組名稱前綴 → 層級；最長前綴優先。
LAYER_OF = {
    "speakllm_jax": "base",
    "speakllm_jax.labels": "base",
    "speakllm_jax.cpu_simulation": "base",
    "speakllm_jax.config": "base",
    "speakllm_jax.text": "text",
    "speakllm_jax.audio": "audio",
    "speakllm_jax.data": "data",
    "speakllm_jax.models": "models",
    "speakllm_jax.checkpoints": "checkpoints",
    "configs": "configs",
    "speakllm_jax.training": "training",
    "speakllm_jax.eval": "eval",
    "export": "export",
    "export.serving": "serving",
    # 經真實伺服器的輪替評估：組合伺服器、服務設定與評估指標，是入口層的工具，不在服務路徑上。
    "export.serving.duplex_eval": "entry",
    "launch": "entry",
    "data": "entry",
    "benchmarks": "entry",
}
_BELOW_MODELS = {"base", "text", "audio"}
_JAX_SIDE = _BELOW_MODELS | {"data", "models", "checkpoints", "configs", "training"}
# 每一層可以匯入的層。
ALLOWED = {
    "base": {"base"},
    "text": {"base", "text"},
    "audio": {"base", "text", "audio"},
    "data": {"base", "text", "audio", "data"},
    "models": _BELOW_MODELS | {"models"},
    "checkpoints": _BELOW_MODELS | {"models", "checkpoints"},
    "configs": _BELOW_MODELS | {"data", "models", "configs"},
    "training": _JAX_SIDE,
    "eval": _JAX_SIDE | {"eval"},
    "export": _JAX_SIDE | {"export", "serving"},
    # 服務端讀自己的設定定義（configs/serving.py，只用 ml_collections）。
    "serving": {"base", "text", "audio", "data", "configs", "export", "serving"},
    "entry": _JAX_SIDE | {"eval", "export", "serving", "entry"},
}
JAX_MODULES = ("jax", "flax", "optax", "orbax", "jaxlib")

# 允許清單：(匯入者, 被匯入者) → 為什麼還在、該怎麼修。
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("speakllm_jax.audio.vad", "speakllm_jax.data.manifest"): (
        "清單層級的 resample_split 應移到 speakllm_jax/data/（例如 data/segment.py）；"
        "本輪 CLI 錯誤訊息的修改也在這個函式，合併後再移"
    ),
}
# 仍然存在的環（模組集合）。
ALLOWED_CYCLES: list[frozenset[str]] = []
# speakllm_jax 中在模組層級匯入 torch 的模組。
ALLOWED_TORCH: dict[str, str] = {}
# 服務端模組層級可達、且匯入 jax／flax 的模組 → 為什麼還在。
ALLOWED_SERVING_JAX: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(p)] = p
    return out


MODULES = _modules()


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _imports(name: str) -> list[tuple[str, bool]]:
    """(被匯入的模組, 是否在模組層級)；`from a import b` 在 a.b 是模組時指向 a.b。"""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            # `if TYPE_CHECKING:` 區塊只給型別檢查器，執行期不匯入，不算模組層級。
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            inner = inner and not _is_type_checking(child)
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = _resolve(name, child)
                subs = [f"{mod}.{a.name}" for a in child.names if f"{mod}.{a.name}" in MODULES]
                found.extend((s, top) for s in subs)
                if len(subs) < len(child.names):
                    found.append((mod, top))
            visit(child, inner)

    visit(tree, True)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _internal(target: str) -> str | None:
    """外部套件回傳 None；內部模組回傳掃描到的最長前綴模組名稱。"""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:i])]
    raise KeyError(f"{module} 不在層級表中：請加進 LAYER_OF")


def upward_imports() -> dict[tuple[str, str], str]:
    bad = {}
    for m, edges in GRAPH.items():
        for target, _ in edges:
            t = _internal(target)
            if t is None or t == m:
                continue
            if layer(t) not in ALLOWED[layer(m)]:
                bad[(m, t)] = f"{layer(m)} → {layer(t)}"
    return bad


def cycles() -> list[frozenset[str]]:
    """內部匯入圖（含函式內匯入）的強連通分量中多於一個模組者（Tarjan）。"""
    adj = {m: sorted({t for x, _ in e if (t := _internal(x)) and t != m}) for m, e in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in adj:
        if v not in index:
            strong(v)
    return out


def _top_external(m: str) -> set[str]:
    return {t.split(".")[0] for t, top in GRAPH[m] if top and _internal(t) is None}


def torch_at_module_level() -> set[str]:
    return {m for m in MODULES if m.startswith("speakllm_jax") and "torch" in _top_external(m)}


def serving_reaches_jax() -> dict[str, list[str]]:
    """服務端模組在模組層級（連同上層套件的 __init__）可達、且直接匯入 jax 系套件的模組 → 路徑。"""
    found: dict[str, list[str]] = {}
    start = [m for m in MODULES if layer(m) == "serving"]
    seen: dict[str, list[str]] = {m: [m] for m in start}
    todo = list(start)
    while todo:
        m = todo.pop()
        if _top_external(m) & set(JAX_MODULES):
            found.setdefault(m, seen[m])
        nxt = []
        for t, top in GRAPH[m]:
            t2 = _internal(t) if top else None
            if t2:
                parts = t2.split(".")
                nxt += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for t in nxt:
            if t in MODULES and t not in seen:
                seen[t] = seen[m] + [t]
                todo.append(t)
    return found


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_imports_only_point_down():
    bad = upward_imports()
    new = {k: v for k, v in bad.items() if k not in ALLOWED_UPWARD}
    assert not new, "往上的匯入：\n" + "\n".join(f"{a} → {b}（{v}）" for (a, b), v in new.items())
    stale = set(ALLOWED_UPWARD) - set(bad)
    assert not stale, f"允許清單中已修好的項目，請從 ALLOWED_UPWARD 刪掉：{sorted(stale)}"


def test_no_import_cycles():
    found = cycles()
    new = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not new, f"匯入環：{new}"
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not stale, f"允許清單中已不存在的環，請從 ALLOWED_CYCLES 刪掉：{stale}"


def test_jax_path_imports_no_torch_at_module_level():
    found = torch_at_module_level()
    assert not found - set(ALLOWED_TORCH), (
        f"模組層級匯入 torch：{sorted(found - set(ALLOWED_TORCH))}"
    )
    stale = set(ALLOWED_TORCH) - found
    assert not stale, f"請從 ALLOWED_TORCH 刪掉：{sorted(stale)}"


def test_serving_path_imports_no_jax():
    found = serving_reaches_jax()
    new = {m: p for m, p in found.items() if m not in ALLOWED_SERVING_JAX}
    assert not new, "服務端可達 jax：\n" + "\n".join(" → ".join(p) for p in new.values())
    stale = set(ALLOWED_SERVING_JAX) - set(found)
    assert not stale, f"請從 ALLOWED_SERVING_JAX 刪掉：{sorted(stale)}"


@pytest.mark.parametrize(
    "source, expect",
    [
        ("from speakllm_jax.training.sharding import x", "speakllm_jax.training.sharding"),
        ("def f():\n    from speakllm_jax.data import interleave", "speakllm_jax.data.interleave"),
    ],
)
def test_scanner_sees_module_level_and_function_local_imports(source, expect, monkeypatch):
    """掃描器本身：函式內匯入也算，`from 套件 import 模組` 指向該模組。"""
    name = "speakllm_jax.models.layers"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert [t for t, _ in _imports(name)] == [expect]
    assert layer(_internal(expect)) not in ALLOWED[layer(name)]


def _uncommented_local_imports(path: Path) -> list[int]:
    """函式內、沒有註解說明理由的匯入 → 行號。

    理由寫在上一行或匯入行尾；緊接在有理由的匯入之後（中間只有空行）的匯入屬同一組，沿用該理由。
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    commented = {
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    }
    bad: list[int] = []

    def visit(node: ast.AST, local: bool) -> None:
        prev_reasoned = 0  # 同一區塊中上一個敘述若是有理由的匯入：其最後一行
        for child in ast.iter_child_nodes(node):
            if local and isinstance(child, ast.Import | ast.ImportFrom):
                above = lines[child.lineno - 2].strip() if child.lineno > 1 else ""
                span = range(child.lineno, (child.end_lineno or child.lineno) + 1)
                gap = lines[prev_reasoned : child.lineno - 1] if prev_reasoned else None
                if (
                    above.startswith("#")
                    or commented.intersection(span)
                    or (gap is not None and not any(g.strip() for g in gap))
                ):
                    prev_reasoned = span[-1]
                else:
                    bad.append(child.lineno)
                    prev_reasoned = 0
            elif isinstance(child, ast.stmt):
                prev_reasoned = 0
            visit(child, local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(text), False)
    return bad


def test_function_local_imports_say_why():
    """函式內匯入只留給重的選用套件、保持不載入 JAX 或打破環，且每個都有一行註解說明理由。"""
    found = [
        f"{p.relative_to(ROOT)}:{line}"
        for m, p in MODULES.items()
        if m.split(".")[0] in ("speakllm_jax", "export", "launch", "benchmarks")
        or m == "configs.models"
        for line in _uncommented_local_imports(p)
    ]
    assert not found, (
        "沒有註明理由的函式內匯入（請移到模組頂端，或在上一行註明理由）：\n" + "\n".join(found)
    )


def test_local_import_check_sees_missing_reason(tmp_path):
    """檢查本身：沒有理由的函式內匯入被抓到；有註解的、緊接其後同一組的與模組層級的不算。"""
    src = tmp_path / "m.py"
    src.write_text(
        "import os\n\n\ndef f():\n    import json\n\n    # 延後匯入：很重\n    import ray\n"
        "    import ray.data\n\n    import yaml  # 延後匯入：選用\n    x = 1\n    import toml\n"
        "    return os, json, ray, yaml, toml, x\n",
        encoding="utf-8",
    )
    assert _uncommented_local_imports(src) == [5, 13]


def test_scanner_type_checking_block_is_not_module_level(monkeypatch):
    """`if TYPE_CHECKING:` 內的匯入執行期不發生：看得到，但不算模組層級。"""
    src = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import jax\nimport numpy\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: src)
    assert _imports("speakllm_jax.audio.features") == [
        ("typing", True),
        ("jax", False),
        ("numpy", True),
    ]
