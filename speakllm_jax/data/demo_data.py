"""訓練預設資料：沒有指定清單時，使用內建示範語料（必要時先以 espeak-ng 生成）。

流程與真實語料相同：原始目錄格式 → 轉接器產生清單 → 中文正規化（OpenCC t2s）。
生成結果快取在 `demo_dir`（以 `demo_info.json` 判斷是否已完成），重複呼叫不會重做。
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from speakllm_jax.cli import UserValueError
from speakllm_jax.data.adapters import build_manifests
from speakllm_jax.data.demo_corpus import DEMO_DIR, make_demo_corpus
from speakllm_jax.data.demo_dialogues import DIALOGUE_DIR, DIALOGUE_INFO, make_turn_dialogues
from speakllm_jax.text.manifest_text import normalize_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CORPORA: dict[str, dict[str, str]] = {
    "aishell1": {"adapter": "aishell1", "root": "aishell"},
    "commonvoice_zh": {"adapter": "commonvoice", "root": "commonvoice/cv-corpus-0.0-demo/zh-TW"},
    "commonvoice_en": {"adapter": "commonvoice", "root": "commonvoice/cv-corpus-0.0-demo/en"},
    "dialogue": {"adapter": "dialogue", "root": "dialogues"},
    "instructions": {"adapter": "instructions", "root": "instructions"},
    # 輪替示範對話（`make_demo_corpus.py --dialogues N`；不在預設語料裡）。
    "duplex_dialogue": {"adapter": "dialogue", "root": DIALOGUE_DIR},
}
DEFAULT_TURN_DIALOGUES = 10


def default_demo_dir() -> Path:
    """示範語料的預設位置：環境變數 `SPEAKLLM_DEMO_DIR`，否則為專案根目錄下的 `DEMO_DIR`。"""
    return Path(os.environ.get("SPEAKLLM_DEMO_DIR", REPO_ROOT / DEMO_DIR))


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
        raise UserValueError(f"未知的示範語料 {unknown}；可用：{sorted(DEMO_CORPORA)}")
    root = ensure_demo_corpus(demo_dir, seed)
    name = "_".join(corpora) + (f".{split}" if split else "")
    return _norm_manifest(root, corpora, name, split)


def _norm_manifest(root: Path, corpora: Sequence[str], name: str, split: str | None) -> Path:
    """以轉接器建立 `root/manifests/{name}.norm.jsonl`（OpenCC t2s 正規化）；已存在就沿用。"""
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


def turn_dialogue_manifest(
    demo_dir: str | os.PathLike | None = None,
    n: int = DEFAULT_TURN_DIALOGUES,
    seed: int = 0,
    split: str | None = None,
    compact: bool = False,
) -> Path:
    """輪替示範對話（`demo_dialogues.make_turn_dialogues`）的正規化清單；對話不存在或 n、種子、
    `compact` 不同時重新生成。`split=None` 時包含所有切分。"""
    root = Path(demo_dir) if demo_dir else default_demo_dir()
    info_path = root / DIALOGUE_INFO
    info = json.loads(info_path.read_text("utf-8")) if info_path.is_file() else {}
    if (info.get("n"), info.get("seed"), info.get("compact")) != (n, seed, compact):
        shutil.rmtree(root / DIALOGUE_DIR, ignore_errors=True)
        for old in (root / "manifests").glob("duplex_dialogue*.jsonl"):
            old.unlink()
        print(f"生成 {n} 段輪替示範對話到 {root / DIALOGUE_DIR}（espeak-ng）…")
        make_turn_dialogues(root, n, seed, compact)
    name = "duplex_dialogue" + (f".{split}" if split else "")
    return _norm_manifest(root, ["duplex_dialogue"], name, split)


DEMO_SPEECH_TOKENIZERS = ("voila", "cosyvoice2")


def duplex_paths(
    demo_dir: str | os.PathLike | None = None, tokenizer: str = "voila"
) -> dict[str, Path]:
    """示範全雙工資料的位置：對話清單（雙聲道對話、語音指令排成的對話）與各自的語音碼資料夾。

    兩種語音符號共用同一份清單；碼以語句 id 為鍵，分放在不同資料夾：
    `voila` 為 `duplex/codes_{dialogue,instructions}`（[4, frames]），
    `cosyvoice2` 為 `duplex/codes_cosyvoice2_{dialogue,instructions}`（[1, frames]，碼本 6561）。
    """
    if tokenizer not in DEMO_SPEECH_TOKENIZERS:
        raise UserValueError(f"未知的語音符號 {tokenizer!r}；可用：{DEMO_SPEECH_TOKENIZERS}")
    root = Path(demo_dir) if demo_dir else default_demo_dir()
    d = root / "duplex"
    if tokenizer == "cosyvoice2":
        return {
            "dialogue": d / "dialogue.jsonl",
            "instructions": d / "instructions.jsonl",
            "dialogue_codes": d / "codes_cosyvoice2_dialogue",
            "instructions_codes": d / "codes_cosyvoice2_instructions",
            "tokenizer": d / "s3tokenizer_v2_demo",
        }
    return {
        "dialogue": d / "dialogue.jsonl",
        "instructions": d / "instructions.jsonl",
        "dialogue_codes": d / "codes_dialogue",
        "instructions_codes": d / "codes_instructions",
        "tokenizer": d / "voila_tokenizer_demo",
    }
