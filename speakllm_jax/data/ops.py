"""具名的逐列處理步驟（op）與它們的組合，仿 big_vision 的登錄式前處理。

每個 op 以 `@register_op("名稱")` 登錄一個工廠 `factory(ctx, **kwargs) -> op`；`op(ex) -> ex`
讀寫一個 dict（輸入列在 `ex["row"]`），無法處理時拋出 `SkipExample`（依原因計數後略過）。
`compose("load_audio|log_mel(n_mels=80)|pad_frames", ctx)` 依序建立各 op；規格也可是名稱清單。
`ctx` 帶共用的物件（分詞器、語音碼、設定），規格裡的 `k=v` 是各 op 自己的參數。

`RowOps` 把組合好的 op 套到一列上：成功時依批次綱要（`data.schema.BatchSchema`）只留綱要的欄位，
略過時記入 `SkipCounter`（在 Grain 管線中由取用端的 filter 計數並濾掉）。
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from typing import Any

from speakllm_jax.audio.io import AudioError, SkipCounter
from speakllm_jax.data.schema import BatchSchema

Op = Callable[[dict[str, Any]], dict[str, Any]]
OpFactory = Callable[..., Op]

OPS: dict[str, OpFactory] = {}
# 略過標記的鍵（`RowOps.process` 的回傳值中）。
SKIP_KEY = "_skip"


class SkipExample(Exception):
    """這一列不能用：`reason` 為計數用的原因代碼；`report=True` 時另在 stdout 印一行。"""

    def __init__(self, reason: str, detail: str = "", *, report: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.report = report


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """以名稱登錄一個 op 工廠；同名重複登錄是程式錯誤。"""

    def wrap(factory: OpFactory) -> OpFactory:
        if name in OPS and OPS[name] is not factory:
            raise ValueError(f"op {name!r} 已登錄")
        OPS[name] = factory
        return factory

    return wrap


def parse_ops(spec: str | Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """`"a|b(k=1, s='x')"` 或 `["a", "b(k=1)"]` → `[("a", {}), ("b", {"k": 1, "s": "x"})]`。

    參數值以 Python 字面值解析（數字、字串、布林、None、tuple）。
    """
    items = spec.split("|") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, dict[str, Any]]] = []
    for item in (str(x).strip() for x in items):
        if not item:
            continue
        try:
            node = ast.parse(item, mode="eval").body
            if isinstance(node, ast.Name):
                out.append((node.id, {}))
                continue
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                raise ValueError("應寫成 名稱 或 名稱(k=v, …)")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (SyntaxError, ValueError) as err:
            raise ValueError(f"data.ops 的 {item!r} 無法解析：{err}") from err
        if None in kwargs:
            raise ValueError(f"data.ops 的 {item!r} 不接受 **kwargs")
        out.append((node.func.id, kwargs))
    return out


def compose(spec: str | Sequence[str], ctx: Any = None) -> list[tuple[str, Op]]:
    """依規格建立 op 清單 [(名稱, op)]；名稱不明時列出已登錄的 op。"""
    ops = []
    for name, kwargs in parse_ops(spec):
        if name not in OPS:
            raise ValueError(f"data.ops：未知的 op {name!r}；可用：{sorted(OPS)}")
        try:
            ops.append((name, OPS[name](ctx, **kwargs)))
        except TypeError as err:
            raise ValueError(f"data.ops 的 {name}：參數不對（{err}）") from err
    return ops


def apply_ops(ops: Sequence[tuple[str, Op]], ex: dict[str, Any]) -> dict[str, Any]:
    """依序套用 op（不攔截例外）。"""
    for _, op in ops:
        ex = op(ex)
    return ex


class RowOps:
    """一列 → 綱要欄位的 dict，或 None（略過並記入 `skips`）。

    原因：`SkipExample` 自帶；`AudioError` 用它的 reason；`ValueError`／`KeyError`（清單列缺欄位、
    形狀不符）記為 `bad_row` 並印一行。

    Grain 管線用 `.map(ops.process)…filter(ops.keep)`：`process` 在預取執行緒裡跑、略過時回傳標記，
    `keep` 在取用端計數並濾掉標記。計數因此只含已取用的列，與迭代器狀態一致（恢復後不重複計數）。
    """

    def __init__(
        self, ops: Sequence[tuple[str, Op]], schema: BatchSchema, skips: SkipCounter
    ) -> None:
        self.ops = list(ops)
        self.schema = schema
        self.skips = skips

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.ops]

    def process(self, row: dict[str, Any]) -> dict[str, Any]:
        """一列 → 綱要欄位，或略過標記 `{SKIP_KEY: (鍵, 原因, 說明)}`（不計數）。"""
        key = row.get("id", "?") if isinstance(row, dict) else "?"
        try:
            ex = apply_ops(self.ops, {"row": row})
        except SkipExample as s:
            if s.report:
                print(f"略過 {key}: {s.detail}")
            return {SKIP_KEY: (key, s.reason, s.detail)}
        except AudioError as err:
            return {SKIP_KEY: (key, err.reason, err.detail or str(err))}
        except (ValueError, KeyError) as err:
            print(f"略過 {key}: {err}")
            return {SKIP_KEY: (key, "bad_row", str(err))}
        return self.schema.select(ex)

    def keep(self, x: dict[str, Any]) -> bool:
        """略過標記 → 計數並回傳 False；正常的樣本回傳 True。"""
        if SKIP_KEY in x:
            self.skips.add(*x[SKIP_KEY])
            return False
        return True

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        x = self.process(row)
        return x if self.keep(x) else None
