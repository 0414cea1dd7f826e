"""JAX 串流推論：逐幀（KV 快取、分塊 Whisper 編碼）與整段前向的每幀 logits 相同；自由執行可跑完。"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.models import model_config
from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config
from speakllm_jax.models.streaming import (
    encode_user_stream,
    encoder_window_frames,
    run_streaming,
)


def _model() -> SpeakLLM:
    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.qwen.vocab_size = 256
    mc.speech.codebook_size = 64
    return SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))


def test_streaming_equals_full_forward_per_frame() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    b, n, chunk = 2, 8, 4
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    text_in = jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32)
    tones_in = jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32)
    codes_in = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    valid = jnp.asarray(rng.random((b, n)) > 0.3)
    target = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    full = model.duplex_forward(
        feats,
        jnp.ones((b, 4 * n), bool),
        text_in,
        tones_in,
        codes_in,
        valid,
        target,
        jnp.ones((b, n), bool),
        chunk_frames=chunk * model.connector.stack,
    )
    teacher = dict(
        text_in=text_in,
        tones_in=tones_in,
        codes_in=codes_in,
        codes_in_valid=valid,
        codes_target=target,
    )
    out = run_streaming(model, feats, n, chunk, teacher=teacher)
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    np.testing.assert_allclose(out.turn_logits, np.asarray(full["turn"]), atol=1e-4)
    np.testing.assert_allclose(out.code_logits, np.asarray(full["codes"]), atol=1e-4)

    # 不同區塊大小的整段前向確實不同：等式不是因為遮罩沒作用。
    other = model.duplex_forward(
        feats,
        jnp.ones((b, 4 * n), bool),
        text_in,
        tones_in,
        codes_in,
        valid,
        target,
        jnp.ones((b, n), bool),
        chunk_frames=None,
    )
    assert np.abs(np.asarray(other["text"]) - out.text_logits).max() > 1e-5


def test_free_running_produces_frames() -> None:
    model = _model()
    feats = jnp.asarray(np.random.default_rng(1).standard_normal((1, 80, 40)).astype(np.float32))
    out = run_streaming(model, feats, 10, 5)
    assert out.text.shape == (1, 10) and out.turn.shape == (1, 10) and out.codes.shape == (1, 10, 4)
    assert out.codes.min() >= 0 and out.codes.max() < 64


def test_audio_longer_than_encoder_window_is_encoded_in_windows() -> None:
    # 編碼器上限 16 個輸出框 → 一窗 8 個 LLM 幀；20 幀的音訊切成 8 + 8 + 4 三窗。
    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.qwen.vocab_size = 256
    mc.speech.codebook_size = 64
    mc.whisper.max_source_positions = 16
    model = SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    b, n, chunk = 1, 20, 4
    stack = model.connector.stack
    assert encoder_window_frames(model, chunk) == 8
    feats = jnp.asarray(rng.standard_normal((b, 80, 4 * n)).astype(np.float32))
    with pytest.raises(ValueError, match="max_source_positions"):
        model.encode_audio(feats, chunk_frames=chunk * stack)
    # 逐窗：每窗獨立以區塊因果遮罩編碼（位置從 0 起），串接。
    parts = [
        model.encode_audio(feats[:, :, 4 * s : 4 * min(s + 8, n)], chunk_frames=chunk * stack)[0]
        for s in range(0, n, 8)
    ]
    user = jnp.concatenate(parts, axis=1)
    np.testing.assert_allclose(
        np.asarray(encode_user_stream(model, feats, n, chunk)), np.asarray(user), atol=1e-5
    )
    # 教師強制的串流：LLM 的上下文跨窗連續，每幀 logits 等於逐窗特徵上的整段 LLM 前向。
    text_in = jnp.asarray(rng.integers(0, 256, (b, n)), jnp.int32)
    tones_in = jnp.asarray(rng.integers(0, 6, (b, n, 4)), jnp.int32)
    codes_in = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    valid = jnp.asarray(rng.random((b, n)) > 0.3)
    target = jnp.asarray(rng.integers(0, 64, (b, n, 4)), jnp.int32)
    teacher = dict(
        text_in=text_in,
        tones_in=tones_in,
        codes_in=codes_in,
        codes_in_valid=valid,
        codes_target=target,
    )
    out = run_streaming(model, feats, n, chunk, teacher=teacher)
    x = model.frame_inputs(user, text_in, tones_in, codes_in, valid)
    hidden, _ = model.llm.forward_embeds(x, attention_mask=jnp.ones((b, n), bool))
    full = model.heads(hidden, target, user, jnp.ones((b, n), bool))
    np.testing.assert_allclose(out.text_logits, np.asarray(full["text"]), atol=1e-4)
    np.testing.assert_allclose(out.turn_logits, np.asarray(full["turn"]), atol=1e-4)
    free = run_streaming(model, feats, n, chunk, keep_text_logits=False)
    assert free.text_logits is None and free.turn.shape == (b, n)
