"""語音大模型的組合：Whisper 編碼器（聽）→ 連接器 → Qwen2.5（想）。

本檔目前提供第 0 階段（連接器對齊，ASR）所需的前向：
`[<|task_asr|>, <|audio_start|>] + 音訊嵌入 + [<|audio_end|>] + 轉寫文字`，
只在文字位置計算交叉熵。音訊與文字之間的填充以注意力遮罩遮掉，位置編號由遮罩累加，
所以填充不影響結果（與無填充的單筆計算相同）。
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.models.connector import Connector
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from speakllm_jax.models.whisper import WhisperConfig, WhisperEncoder


@dataclass(frozen=True)
class SpeakLLMConfig:
    """組合模型的設定。"""

    whisper: WhisperConfig
    qwen: Qwen2Config
    connector_stack: int = 2
    connector_hidden: int = 0


class SpeakLLM(nnx.Module):
    """Whisper 編碼器 + 連接器 + Qwen2 語言模型。

    參數路徑前綴：`encoder/…`、`connector/…`、`llm/…`（訓練設定的 `trainable` 依此篩選）。
    """

    def __init__(self, cfg: SpeakLLMConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.encoder = WhisperEncoder(cfg.whisper, rngs=rngs)
        self.connector = Connector(
            cfg.whisper.d_model,
            cfg.qwen.hidden_size,
            stack=cfg.connector_stack,
            hidden=cfg.connector_hidden,
            dtype=cfg.qwen.dtype,
            param_dtype=cfg.qwen.param_dtype,
            rngs=rngs,
        )
        self.llm = Qwen2ForCausalLM(cfg.qwen, rngs=rngs)

    def encode_audio(
        self,
        features: jax.Array,
        feature_mask: jax.Array | None = None,
        chunk_frames: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`[B, n_mels, F]` 梅爾 → (音訊嵌入 `[B, F/2/stack, hidden]`, 有效遮罩)。"""
        b, _, f = features.shape
        if feature_mask is None:
            feature_mask = jnp.ones((b, f), jnp.bool_)
        enc = self.encoder(features, attention_mask=feature_mask, chunk_frames=chunk_frames)
        enc_mask = feature_mask[:, ::2][:, : enc.shape[1]]
        emb = self.connector(enc)
        mask = Connector.mask(enc_mask, self.connector.stack)
        return emb, mask

    def asr_logits(
        self,
        features: jax.Array,
        feature_mask: jax.Array,
        prefix_ids: jax.Array,
        suffix_ids: jax.Array,
        text_ids: jax.Array,
        text_mask: jax.Array,
    ) -> jax.Array:
        """回傳文字位置的 logits `[B, L, vocab]`：第 i 個位置預測 `text_ids[:, i]`。

        `prefix_ids [P]` 放在音訊之前、`suffix_ids [S]` 在音訊之後（例如 `<|audio_end|>`），
        `text_ids [B, L]` 為目標文字（含結尾的 eos），`text_mask [B, L]`。
        """
        audio, audio_mask = self.encode_audio(features, feature_mask)
        b = audio.shape[0]
        pre = self.llm.embed(jnp.broadcast_to(prefix_ids, (b, prefix_ids.shape[0])))
        suf = self.llm.embed(jnp.broadcast_to(suffix_ids, (b, suffix_ids.shape[0])))
        txt = self.llm.embed(text_ids)
        embeds = jnp.concatenate([pre, audio.astype(pre.dtype), suf, txt], axis=1)
        ones_p = jnp.ones((b, prefix_ids.shape[0]), jnp.bool_)
        ones_s = jnp.ones((b, suffix_ids.shape[0]), jnp.bool_)
        mask = jnp.concatenate(
            [ones_p, audio_mask.astype(bool), ones_s, text_mask.astype(bool)], axis=1
        )
        hidden, _ = self.llm.forward_embeds(embeds, attention_mask=mask)
        n = text_ids.shape[1]
        # 位置 (後綴最後一個, 文字 0..L-2) 的輸出預測文字 0..L-1。
        return self.llm.logits(hidden[:, -n - 1 : -1])


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """回傳 (遮罩內交叉熵總和, 有效 token 數, 預測正確數)；以 fp32 計算。"""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * m
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(correct)


def build_speakllm_config(model: Any) -> SpeakLLMConfig:
    """由 `config.model`（見 `configs/models.py`）建立 `SpeakLLMConfig`。"""
    dtype = jnp.dtype(model.dtype)
    param_dtype = jnp.dtype(model.param_dtype)
    common = dict(
        dtype=dtype, param_dtype=param_dtype, remat=model.remat, scan_layers=model.scan_layers
    )
    whisper = WhisperConfig(**dict(model.whisper), **common)
    qwen = Qwen2Config(**dict(model.qwen), **common)
    return SpeakLLMConfig(
        whisper=whisper,
        qwen=qwen,
        connector_stack=int(model.connector.stack),
        connector_hidden=int(model.connector.hidden),
    )
