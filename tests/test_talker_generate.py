"""CosyVoice2 talker 的雙流生成：以 KV 快取逐步生成的語音碼，放回訓練序列版面
（`interleave_fixed` 的 bistream）整段前向時，每個位置的貪婪選擇都與生成結果相同；
塊邊界、強制 fill、task_id 與可選的 Tone-Aware 塊大小都照訓練版面。"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from speakllm_jax.data.interleave import KIND_SPEECH, KIND_TASK, KIND_TEXT, interleave_fixed
from speakllm_jax.models.cosyvoice2_generate import generate_bistream
from speakllm_jax.models.cosyvoice2_talker import CosyVoice2Talker, TalkerConfig
from speakllm_jax.models.qwen2 import Qwen2Config

QWEN = Qwen2Config(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=256,
)
# 官方的語音碼數：隨機權重下 fill／eos 只佔 1/6562，塊幾乎一定滿 n_speech 個（強制 fill）。
SPEECH = 6561
THINKER = 24


def _talker(thinker: int = 0) -> CosyVoice2Talker:
    cfg = TalkerConfig(qwen=QWEN, speech_token_size=SPEECH, thinker_hidden=thinker)
    return CosyVoice2Talker(cfg, rngs=nnx.Rngs(3))


def _check_against_full_forward(talker, text, out, n_text, n_speech, chunks, hidden=None):
    cfg = talker.cfg
    seq = interleave_fixed(
        text,
        out.speech,
        n_text,
        n_speech,
        fill_id=cfg.fill_id,
        task_id=0,
        eos_id=cfg.eos_id,
        sos_id=0,
        mode="bistream",
        text_chunks=chunks,
    )
    ids, kind, tgt = seq["input_ids"], seq["input_kind"], seq["target_ids"]
    th = None
    if hidden is not None:
        # 思考者隱狀態只在文字位置使用：依序放到各文字位置。
        th = np.zeros((len(ids), hidden.shape[1]), np.float32)
        th[kind == KIND_TEXT] = hidden
        th = jnp.asarray(th)[None]
    logits = np.asarray(
        talker.forward_interleaved(jnp.asarray(ids)[None], jnp.asarray(kind)[None], None, th)[0]
    )
    # 訓練版面：每個完整塊 = 文字 + n_speech 個語音；最後一段 = 剩下文字 + task_id + 語音。
    assert int(np.sum(kind == KIND_TASK)) == 1
    assert int(np.sum(kind == KIND_SPEECH)) == len(out.speech)
    checked = 0
    for p in range(len(ids) - 1):
        t = int(tgt[p])
        if t < 0 or t in (cfg.fill_id, cfg.eos_id):
            continue
        # 生成時可選的集合：一般語音碼，加上該段的換段符號（塊內 fill，最後一段 eos）。
        last = p >= int(np.flatnonzero(kind == KIND_TASK)[0])
        allowed = np.concatenate(
            [logits[p, :SPEECH], [logits[p, cfg.eos_id if last else cfg.fill_id]]]
        )
        assert int(np.argmax(allowed)) == t, (p, t)
        checked += 1
    assert checked == len(out.speech)


def test_greedy_bistream_matches_training_layout() -> None:
    talker = _talker()
    text = np.arange(3, 15, dtype=np.int32)  # 12 個文字符號 → 2 個完整塊 + 2 個剩下
    out = generate_bistream(talker, text, n_text=5, n_speech=3, max_speech=10)
    assert out.forced_fill == [True, True]
    assert [len(c) for c in out.chunk_speech] == [3, 3, 4]
    assert out.stopped == "max_speech" and len(out.speech) == 10
    assert all(0 <= s < SPEECH for s in out.speech)
    _check_against_full_forward(talker, text, out, 5, 3, None)


def test_tone_aware_chunks_and_fusion() -> None:
    talker = _talker(THINKER)
    text = np.arange(20, 31, dtype=np.int32)  # 11 個文字
    hidden = np.asarray(jax.random.normal(jax.random.key(1), (11, THINKER)), np.float32)
    chunks = [4, 6]  # 例如 Tone-Aware 把邊界挪到音節上
    out = generate_bistream(
        talker, text, n_text=5, n_speech=2, text_chunks=chunks, thinker_hidden=hidden, max_speech=7
    )
    assert [len(c) for c in out.chunk_speech] == [2, 2, 3]
    _check_against_full_forward(talker, text, out, 5, 2, chunks, hidden)
    # 思考者隱狀態確實影響生成。
    plain = generate_bistream(talker, text, n_text=5, n_speech=2, text_chunks=chunks, max_speech=7)
    assert plain.speech != out.speech


def test_sampling_and_bad_input() -> None:
    talker = _talker()
    text = np.arange(3, 9, dtype=np.int32)
    a = generate_bistream(
        talker, text, n_speech=2, max_speech=5, temperature=1.0, rng=jax.random.key(0)
    )
    b = generate_bistream(
        talker, text, n_speech=2, max_speech=5, temperature=1.0, rng=jax.random.key(0)
    )
    assert a.speech == b.speech
    with pytest.raises(ValueError, match="rng"):
        generate_bistream(talker, text, temperature=1.0)
    with pytest.raises(ValueError, match="text_chunks"):
        generate_bistream(talker, text, text_chunks=[4, 4])
    with pytest.raises(ValueError, match="thinker_hidden"):
        generate_bistream(_talker(THINKER), text, thinker_hidden=np.zeros((2, THINKER)))
