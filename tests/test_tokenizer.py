"""分詞器：真實 Qwen 詞表、專案特殊符號、新增嵌入列。"""

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from speakllm_jax.text.tokenizer import (
    QWEN2_PATTERN,
    QWEN_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    TextTokenizer,
    init_new_embedding_rows,
    load_tokenizer,
    qwen_tiktoken_path,
    save_with_special_tokens,
)

SENTENCES = [
    "今天天气很好，我们去银行取钱。",
    "The quick brown fox jumps over 13 lazy dogs; it's fine!",
    "我今天要开一个meeting，然后去bank办事，大概3.5个小时。",
    "臺灣的捷運很方便\n第二行",
]


def test_same_ids_as_tiktoken(qwen_tokenizer_dir):
    tok = load_tokenizer(qwen_tokenizer_dir)
    enc = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens=QWEN_SPECIAL_TOKENS,
    )
    for s in SENTENCES:
        assert tok.encode(s, add_special_tokens=False) == enc.encode(s)
        assert tok.decode(enc.encode(s)) == s
    for name, idx in QWEN_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(name) == idx


def test_special_tokens_saved_and_reloaded(qwen_tokenizer_dir, tmp_path):
    tok = save_with_special_tokens(qwen_tokenizer_dir, tmp_path / "with_special")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert min(ids.values()) >= 151646  # 接在 Qwen 既有符號之後
    again = TextTokenizer.from_dir(tmp_path / "with_special", add_project_tokens=False)
    for t, i in ids.items():
        assert again.special_id(t) == i
        # 特殊符號在文字中是一個完整符號，不會被切開
        assert again.encode(f"你好{t}")[-1] == i
    with pytest.raises(KeyError, match="no_such"):
        again.special_id("<|no_such|>")


def test_new_embedding_rows_are_mean():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    out = init_new_embedding_rows(emb, 3)
    assert out.shape == (13, 4)
    np.testing.assert_array_equal(out[:10], emb)
    np.testing.assert_allclose(out[10:], np.repeat(emb.mean(0, keepdims=True), 3, 0), rtol=1e-6)
    with pytest.raises(ValueError, match="二維"):
        init_new_embedding_rows(emb[0], 1)
