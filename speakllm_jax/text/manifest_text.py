"""清單層級的文字正規化：逐列正規化 `text`（與 `turns[*].text`），保留原文於 `text_raw`。

非 UTF-8、無法解析的 JSON 或空白文字的列會被略過並依原因計數，寫入 `OUT.skipped.jsonl`。
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from speakllm_jax.cli import UserFileError
from speakllm_jax.text.normalize import normalize_zh


@dataclass
class NormalizeReport:
    """正規化結果的計數。"""

    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def table(self) -> str:
        lines = [f"寫出 {self.written} 列；略過 {sum(self.skipped.values())} 列"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  {reason:<16} {n}")
        return "\n".join(lines)


def normalize_row(
    row: dict, conversion: str = "t2s", verbalize: bool = False, keep_punct: bool = True
) -> str | None:
    """就地正規化一列的 `text` 與 `turns[*].text`（原文存到 `text_raw`）；該略過時回傳原因代碼。"""
    text = row.get("text")
    has_turns = bool(row.get("turns"))
    if not isinstance(text, str) or (not text.strip() and not has_turns):
        return "empty_text"
    row["text_raw"] = row.get("text_raw", text)
    row["text"] = normalize_zh(text, conversion, verbalize, keep_punct)
    if not row["text"] and not has_turns:
        return "empty_after_norm"
    for turn in row.get("turns") or []:
        if isinstance(turn.get("text"), str):
            turn["text"] = normalize_zh(turn["text"], conversion, verbalize, keep_punct)
    return None


def normalize_manifest(
    src: str | Path,
    dst: str | Path,
    conversion: str = "t2s",
    verbalize: bool = False,
    keep_punct: bool = True,
) -> NormalizeReport:
    """正規化整份清單，回傳計數報告。"""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserFileError(f"清單不存在：{src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    rep = NormalizeReport()
    skipped_path = (
        dst.with_name(dst.name + ".skipped.jsonl")
        if dst.suffix != ".jsonl"
        else dst.with_suffix(".skipped.jsonl")
    )
    with (
        src.open("rb") as fin,
        dst.open("w", encoding="utf-8") as fout,
        skipped_path.open("w", encoding="utf-8") as fskip,
    ):
        for lineno, raw in enumerate(tqdm(fin, desc="normalize", unit="列"), start=1):
            if not raw.strip():
                continue
            reason, row = None, None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                reason = "non_utf8"
            if reason is None:
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError
                except ValueError:
                    reason = "bad_json"
            if reason is None:
                reason = normalize_row(row, conversion, verbalize, keep_punct)
            if reason:
                rep.skipped[reason] += 1
                fskip.write(
                    json.dumps(
                        {"line": lineno, "reason": reason, "id": (row or {}).get("id")},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                continue
            fout.write(json.dumps(row, ensure_ascii=False) + "\n")
            rep.written += 1
    return rep
