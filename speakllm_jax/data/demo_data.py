"""訓練預設資料：沒有指定清單時，使用內建示範語料（必要時先以 espeak-ng 生成）。

流程與真實語料相同：原始目錄格式 → 轉接器產生清單 → 中文正規化（OpenCC t2s）。
生成結果快取在 `demo_dir`（以 `demo_info.json` 判斷是否已完成），重複呼叫不會重做。
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from speakllm_jax.data.adapters import build_manifests
from speakllm_jax.data.demo_corpus import make_demo_corpus
from speakllm_jax.text.manifest_text import normalize_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CORPORA: dict[str, dict[str, str]] = {
    "aishell1": {"adapter": "aishell1", "root": "aishell"},
    "commonvoice_zh": {"adapter": "commonvoice", "root": "commonvoice/cv-corpus-0.0-demo/zh-TW"},
    "commonvoice_en": {"adapter": "commonvoice", "root": "commonvoice/cv-corpus-0.0-demo/en"},
    "dialogue": {"adapter": "dialogue", "root": "dialogues"},
    "instructions": {"adapter": "instructions", "root": "instructions"},
}


def default_demo_dir() -> Path:
    """示範語料的預設位置：環境變數 `SPEAKLLM_DEMO_DIR`，否則為專案根目錄下的 `demo_corpus/`。"""
    return Path(os.environ.get("SPEAKLLM_DEMO_DIR", REPO_ROOT / "demo_corpus"))


def ensure_demo_corpus(demo_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """確保示範語料存在；不存在時生成。回傳其資料夾。"""
    root = Path(demo_dir) if demo_dir else default_demo_dir()
    if not (root / "demo_info.json").exists():
        print(f"生成示範語料到 {root}（espeak-ng）…")
        make_demo_corpus(root, seed=seed)
    return root


def demo_manifest(
    corpora: Sequence[str],
    demo_dir: str | os.PathLike | None = None,
    split: str | None = "train",
    seed: int = 0,
) -> Path:
    """建立（或沿用）示範語料的正規化清單，回傳路徑。"""
    unknown = [c for c in corpora if c not in DEMO_CORPORA]
    if unknown:
        raise ValueError(f"未知的示範語料 {unknown}；可用：{sorted(DEMO_CORPORA)}")
    root = ensure_demo_corpus(demo_dir, seed)
    name = "_".join(corpora) + (f".{split}" if split else "")
    out_dir = root / "manifests"
    final = out_dir / f"{name}.norm.jsonl"
    if final.exists():
        return final
    raw = out_dir / f"{name}.jsonl"
    spec = {
        "corpora": [
            {
                "name": c,
                "adapter": DEMO_CORPORA[c]["adapter"],
                "root": str(root / DEMO_CORPORA[c]["root"]),
            }
            for c in corpora
        ]
    }
    build_manifests(spec, raw, splits=[split] if split else None, log=lambda s: None)
    tmp = final.with_suffix(".tmp.jsonl")
    normalize_manifest(raw, tmp, conversion="t2s")
    tmp.replace(final)
    return final
