"""共用注意力核心：GQA 點積、遮罩與環狀快取的行為（對照直接以 numpy 寫出的計算）。"""

import jax.numpy as jnp
import numpy as np

from speakllm_jax.models.attention import (
    KVCache,
    attend,
    block_causal_mask,
    self_attention_mask,
)


def _reference(q, k, v, mask, scale):
    """每個查詢頭配對應的 KV 頭（重複 H/K 次），逐頭 softmax。"""
    h, kv = q.shape[2], k.shape[2]
    k = np.repeat(k, h // kv, axis=2)
    v = np.repeat(v, h // kv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(mask[:, None], s, -1e9)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_gqa_attend_matches_repeated_heads_with_padding_and_causal_mask():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 5, 6, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[1, :2] = False  # 左填充
    mask, key_valid = self_attention_mask(jnp.asarray(valid))
    mask = np.asarray(mask)
    np.testing.assert_array_equal(key_valid, valid)
    assert mask.shape == (b, t, t)
    # 因果：第 i 個詞不看 j > i；填充的鍵看不到。
    assert not mask[0][np.triu_indices(t, 1)].any()
    assert not mask[1][:, :2].any()
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, d**-0.5))
    rows = mask.any(-1)  # 沒有任何可看鍵的列（填充的查詢）不比較
    want = _reference(q, k, v, mask, d**-0.5)
    np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)


def test_block_causal_mask_with_bounded_left_context():
    m = np.asarray(block_causal_mask(6, 2, left_chunks=1))
    # 框 4、5 屬第 2 塊：看第 1、2 塊（框 2..5），不看第 0 塊。
    np.testing.assert_array_equal(m[4], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(m[1], [1, 1, 0, 0, 0, 0])


def test_ring_cache_keeps_sinks_and_overwrites_oldest_block():
    # 1 個注意力槽 + 2 個環狀槽；一次一個詞。
    cache = KVCache.create(1, 1, 3, 1, 2, jnp.float32, ring=True, sinks=1)
    slots = []
    for _ in range(5):
        slots.append(int(cache.write_slot()))
        new = jnp.ones((1, 1), jnp.bool_)
        mask, key_valid = self_attention_mask(new, cache)
        assert bool(jnp.all(mask[0, 0] == key_valid[0]))  # 環狀快取：看得見所有有效槽
        cache = cache.advanced(cache.k, cache.v, key_valid, new)
    assert slots == [0, 1, 2, 1, 2]
    assert int(cache.index) == 5 and int(cache.next_pos[0]) == 5
