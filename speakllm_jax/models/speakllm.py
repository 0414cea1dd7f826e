"""語音大模型的組合：Whisper 編碼器（聽）→ 連接器 → Qwen2.5（想）。

兩種前向：

- 第 0 階段（連接器對齊，ASR）：`[<|task_asr|>, <|audio_start|>] + 音訊嵌入 + [<|audio_end|>] +
  轉寫文字`，只在文字位置計算交叉熵。音訊與文字之間的填充以注意力遮罩遮掉，位置編號由
  遮罩累加，所以填充不影響結果（與無填充的單筆計算相同）。
- 第 1–3 階段（全雙工幀模型）：時間以 40 ms 幀前進；第 t 幀的 LLM 輸入是
  「使用者串流（連接器輸出，永遠開著）＋助理自己上一幀的輸出（文字符號嵌入＋聲調嵌入＋
  語音碼嵌入平均）＋情緒條件」之和。每幀的隱狀態接四個頭：文字（LM 頭）、語音碼（深度
  Transformer）、輪替（listen／speak／continue／yield／backchannel）、聲調（輔助）；
  情緒頭則接在使用者串流的平均上。
  `speech_head="cosyvoice2"` 時語音碼頭換成 CosyVoice2 的 talker（單碼本 6561 + 3）：每幀輸入為
  「思考者隱狀態與該幀輸出文字嵌入的閘控融合＋上一幀語音碼嵌入（無效時 sos）」，在幀上因果前向，
  見 `speakllm_jax.models.cosyvoice2_talker`。
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.labels import NUM_EMOTIONS, NUM_TONES, NUM_TURN_ACTIONS
from speakllm_jax.models.connector import Connector
from speakllm_jax.models.cosyvoice2_talker import CosyVoice2Talker, TalkerConfig
from speakllm_jax.models.layers import dense, partitioned
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from speakllm_jax.models.speech_heads import DepthTransformer, SpeechCodeEmbedding, SpeechHeadConfig
from speakllm_jax.models.whisper import WhisperConfig, WhisperEncoder


@dataclass(frozen=True)
class SpeakLLMConfig:
    """組合模型的設定。"""

    whisper: WhisperConfig
    qwen: Qwen2Config
    connector_stack: int = 2
    connector_hidden: int = 0
    # 語音頭："none"（只有第 0 階段）、"voila"（深度 Transformer）或 "cosyvoice2"（talker）。
    speech_head: str = "none"
    speech: SpeechHeadConfig = SpeechHeadConfig()
    # speech_head="cosyvoice2" 時的 talker（其 thinker_hidden 須等於 qwen.hidden_size）。
    talker: TalkerConfig | None = None
    max_chars_per_token: int = 4
    num_emotions: int = 0
    # 長對話的串流方案（訓練的遮罩、JAX 串流與 PyTorch 孿生共用，見 docs/inference_system.md）：
    # 編碼器區塊因果遮罩的左方脈絡區塊數（0 為不限），LLM 的注意力槽（最前面幾幀）與滑動視窗
    # （含目前這一幀的最近幾幀；0 為不限）。
    # `stream_chunk_frames` 為訓練時編碼器區塊因果遮罩的區塊（以 LLM 幀計，0 為整段注意力），
    # 應等於服務端的 `chunk_frames`。
    stream_chunk_frames: int = 0
    encoder_left_chunks: int = 0
    llm_sink_frames: int = 0
    llm_window_frames: int = 0

    @property
    def llm_window(self) -> tuple[int, int] | None:
        """LLM 的（注意力槽幀數, 視窗幀數）；未設定視窗時為 None。"""
        if self.llm_window_frames <= 0:
            return None
        return (self.llm_sink_frames, self.llm_window_frames)


def _checked_talker(cfg: SpeakLLMConfig) -> TalkerConfig:
    """檢查 cosyvoice2 的 talker 設定與思考者一致。"""
    t = cfg.talker
    if t is None:
        raise ValueError("speech_head='cosyvoice2' 需要 SpeakLLMConfig.talker")
    if t.thinker_hidden != cfg.qwen.hidden_size:
        raise ValueError(
            f"talker.thinker_hidden={t.thinker_hidden} 必須等於 qwen.hidden_size={cfg.qwen.hidden_size}"
        )
    if cfg.speech.num_codebooks != 1 or cfg.speech.codebook_size != t.num_speech_tokens:
        raise ValueError(
            "speech_head='cosyvoice2' 的 speech 必須是 1 個碼本、"
            f"{t.num_speech_tokens} 個碼，收到 {cfg.speech.num_codebooks}×{cfg.speech.codebook_size}"
        )
    return t


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
        d = cfg.qwen.hidden_size
        kw = dict(dtype=cfg.qwen.dtype, param_dtype=cfg.qwen.param_dtype)
        if cfg.speech_head in ("voila", "cosyvoice2"):
            # 屬性名 audio_embed 是參數路徑（檢查點、可訓練樣式、匯出鍵都用它），不隨類別改名。
            self.audio_embed = SpeechCodeEmbedding(cfg.speech, d, rngs=rngs, **kw)
            if cfg.speech_head == "voila":
                self.speech_head = DepthTransformer(
                    cfg.speech,
                    d,
                    remat=cfg.qwen.remat,
                    scan_layers=cfg.qwen.scan_layers,
                    rngs=rngs,
                    **kw,
                )
            else:
                self.speech_head = CosyVoice2Talker(_checked_talker(cfg), rngs=rngs)
            self.turn_head = dense(d, NUM_TURN_ACTIONS, ("embed", None), rngs=rngs, **kw)
            self.tone_embed = nnx.Embed(
                NUM_TONES,
                d,
                embedding_init=partitioned(nnx.initializers.normal(0.02), (None, "embed")),
                rngs=rngs,
                **kw,
            )
            self.tone_head = dense(
                d, cfg.max_chars_per_token * NUM_TONES, ("embed", None), rngs=rngs, **kw
            )
            if cfg.num_emotions:
                self.emotion_head = dense(d, cfg.num_emotions, ("embed", None), rngs=rngs, **kw)
            else:
                self.emotion_head = None
        elif cfg.speech_head != "none":
            raise ValueError(
                f"未知的 speech_head {cfg.speech_head!r}；可用：none、voila、cosyvoice2"
            )

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
        enc = self.encoder(
            features,
            attention_mask=feature_mask,
            chunk_frames=chunk_frames,
            left_chunks=self.cfg.encoder_left_chunks if chunk_frames is not None else 0,
        )
        enc_mask = feature_mask[:, ::2][:, : enc.shape[1]]
        emb = self.connector(enc)
        mask = Connector.mask(enc_mask, self.connector.stack)
        return emb, mask

    def init_audio_stream(self, batch: int, chunk_frames: int) -> dict[str, Any]:
        """使用者聲道的串流編碼狀態；`chunk_frames` 以 LLM 幀計（每區塊 `chunk_frames·stack`
        個編碼器框），左方脈絡為 `cfg.encoder_left_chunks` 個區塊。"""
        left = self.cfg.encoder_left_chunks
        if left <= 0:
            raise ValueError("串流編碼需要 encoder_left_chunks ≥ 1（有界的左方脈絡）")
        return self.encoder.init_stream(batch, chunk_frames * self.connector.stack, left)

    def stream_audio(
        self, state: dict[str, Any], mel: jax.Array, valid: Any = None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """編碼下一個區塊（見 `WhisperEncoder.stream_chunk`）→ (`[B, chunk_frames, hidden]`, 新狀態)；
        與 `encode_audio(..., chunk_frames)` 整段結果的對應幀相同。"""
        enc, state = self.encoder.stream_chunk(state, mel, valid)
        return self.connector(enc), state

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

    def frame_inputs(
        self,
        user: jax.Array,
        text_in: jax.Array,
        tones_in: jax.Array,
        codes_in: jax.Array,
        codes_in_valid: jax.Array,
        cond: jax.Array | None = None,
    ) -> jax.Array:
        """組出每幀的 LLM 輸入 `[B, N, d]`（各項相加）。

        `user [B, N, d]` 使用者串流；`text_in [B, N]` 助理上一幀的文字符號（無文字時為填充符號）；
        `tones_in [B, N, K]`；`codes_in [B, N, Q]` 與 `codes_in_valid [B, N]` 助理上一幀的語音碼；
        `cond [B, d]` 條件（例如情緒標籤的嵌入），加在每一幀上。
        """
        x = user.astype(self.llm.cfg.dtype) + self.llm.embed(text_in)
        x = x + jnp.sum(self.tone_embed(tones_in), axis=-2).astype(x.dtype)
        x = x + self.audio_embed(codes_in, codes_in_valid).astype(x.dtype)
        if cond is not None:
            x = x + cond[:, None].astype(x.dtype)
        return x

    def duplex_forward(
        self,
        features: jax.Array,
        feature_mask: jax.Array,
        text_in: jax.Array,
        tones_in: jax.Array,
        codes_in: jax.Array,
        codes_in_valid: jax.Array,
        codes_target: jax.Array,
        frame_mask: jax.Array,
        cond_ids: jax.Array | None = None,
        chunk_frames: int | None = None,
        text_out: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """全雙工幀模型的整段前向（訓練用，語音碼以教師強制）。

        `features [B, n_mels, 4N]` 為使用者聲道的梅爾；回傳各頭的 logits：
        `text [B, N, V]`、`codes [B, N, Q, C]`、`turn [B, N, 5]`、`tones [B, N, K, 6]`、
        （有情緒頭時）`emotion [B, E]`，以及 `hidden [B, N, d]`。
        `speech_head="cosyvoice2"` 時必須給 `text_out [B, N]`：思考者每幀輸出的文字符號
        （教師強制時即文字目標），它與每幀隱狀態一起融合成 talker 的輸入；talker 的上一幀
        語音碼即 `codes_in[..., 0]`／`codes_in_valid`（Q = 1）。
        """
        if self.cfg.speech_head == "none":
            raise ValueError("此模型沒有語音頭（speech_head='none'），不能做全雙工前向")
        if self.cfg.speech_head == "cosyvoice2" and text_out is None:
            raise ValueError("speech_head='cosyvoice2' 的全雙工前向需要 text_out（每幀文字目標）")
        user, user_mask = self.encode_audio(features, feature_mask, chunk_frames)
        n = text_in.shape[1]
        if user.shape[1] < n:
            raise ValueError(f"使用者串流只有 {user.shape[1]} 幀，少於文字／語音的 {n} 幀")
        user = user[:, :n] * user_mask[:, :n, None].astype(user.dtype)
        cond = None if cond_ids is None else self.llm.embed(cond_ids)
        x = self.frame_inputs(user, text_in, tones_in, codes_in, codes_in_valid, cond)
        hidden, _ = self.llm.forward_embeds(
            x, attention_mask=frame_mask, window=self.cfg.llm_window
        )
        return self.heads(
            hidden,
            codes_target,
            user,
            frame_mask,
            text_out=text_out,
            codes_in=codes_in,
            codes_in_valid=codes_in_valid,
        )

    def speech_logits(
        self,
        hidden: jax.Array,
        codes_target: jax.Array,
        frame_mask: jax.Array | None = None,
        *,
        text_out: jax.Array | None = None,
        codes_in: jax.Array | None = None,
        codes_in_valid: jax.Array | None = None,
    ) -> jax.Array:
        """語音碼 logits `[B, N, Q, C]`：voila 為深度 Transformer，cosyvoice2 為 talker（Q = 1）。"""
        if self.cfg.speech_head != "cosyvoice2":
            return self.speech_head(hidden, codes_target)
        if text_out is None:
            raise ValueError("speech_head='cosyvoice2' 需要 text_out（思考者每幀輸出的文字符號）")
        prev = None if codes_in is None else codes_in[..., 0]
        return self.speech_head(
            hidden,
            codes_target,
            text_out,
            prev,
            codes_in_valid,
            mask=frame_mask,
            window=self.cfg.llm_window,
        )

    def emotion_logits(self, user: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """使用者串流的情緒 logits `[B, E]`：`user [B, N, d]` 在有效幀上平均後經情緒頭。"""
        if self.emotion_head is None:
            raise ValueError("此模型沒有情緒頭（model.num_emotions=0）")
        pooled = _masked_mean(user, frame_mask)
        return self.emotion_head(pooled.astype(self.llm.cfg.dtype)).astype(jnp.float32)

    def heads(
        self,
        hidden: jax.Array,
        codes_target: jax.Array,
        user: jax.Array | None = None,
        frame_mask: jax.Array | None = None,
        *,
        text_out: jax.Array | None = None,
        codes_in: jax.Array | None = None,
        codes_in_valid: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """由每幀隱狀態計算各頭輸出（cosyvoice2 另需 `text_out` 與上一幀語音碼）。"""
        b, n, _ = hidden.shape
        codes = self.speech_logits(
            hidden,
            codes_target,
            frame_mask,
            text_out=text_out,
            codes_in=codes_in,
            codes_in_valid=codes_in_valid,
        )
        out = {
            "hidden": hidden,
            "text": self.llm.logits(hidden),
            "codes": codes,
            "turn": self.turn_head(hidden).astype(jnp.float32),
            "tones": self.tone_head(hidden)
            .astype(jnp.float32)
            .reshape(b, n, self.cfg.max_chars_per_token, NUM_TONES),
        }
        if self.emotion_head is not None and user is not None:
            out["emotion"] = self.emotion_logits(user, frame_mask)
        return out


def _masked_mean(x: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
    b, n = x.shape[:2]
    m = jnp.ones((b, n), jnp.float32) if frame_mask is None else frame_mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m[..., None], axis=1) / jnp.maximum(
        jnp.sum(m, axis=1, keepdims=True), 1.0
    )


# 子模型設定中不屬於預設區塊（`config.model.whisper`、`.qwen`、`.speech`、`.talker`）的欄位：
# 由 `config.model` 的共用欄位（dtype、remat…）、`config.lora` 或思考者的寬度填入。
SHARED_FIELDS = (
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "hf_extra",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "thinker_hidden",
)


def preset_fields(cfg: Any) -> dict[str, Any]:
    """子模型設定（dataclass）→ 預設區塊的內容：除 `SHARED_FIELDS` 與巢狀設定外的所有欄位。

    `configs/models.py` 的 full 預設由此取得，欄位清單不另外手寫。
    """
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in SHARED_FIELDS and not dataclasses.is_dataclass(getattr(cfg, f.name))
    }


def build_speakllm_config(model: Any, lora: Any = None) -> SpeakLLMConfig:
    """由 `config.model`（見 `configs/models.py`）與 `config.lora` 建立 `SpeakLLMConfig`。"""
    dtype = jnp.dtype(model.dtype)
    param_dtype = jnp.dtype(model.param_dtype)
    common = dict(
        dtype=dtype, param_dtype=param_dtype, remat=model.remat, scan_layers=model.scan_layers
    )
    whisper = WhisperConfig(**dict(model.whisper), **common)
    lora_kw = {}
    if lora is not None and bool(lora.enabled):
        lora_kw = dict(
            lora_rank=int(lora.rank), lora_alpha=float(lora.alpha), lora_targets=tuple(lora.targets)
        )
    qwen = Qwen2Config(**dict(model.qwen), **common, **lora_kw)
    speech = model.get("speech", None)
    speech_head = str(model.get("speech_head", "none"))
    speech_cfg = SpeechHeadConfig(**dict(speech)) if speech is not None else SpeechHeadConfig()
    talker = None
    if speech_head == "cosyvoice2":
        # 選 cosyvoice2 時改用 `model.talker`（見 configs/models.py 的 talker_preset）；思考者自己
        # 的語音碼輸入嵌入變成 1 個碼本、6561 + 3 個碼。
        tk = model.get("talker", None)
        if tk is None:
            raise ValueError("model.speech_head='cosyvoice2' 需要設定區塊 model.talker")
        tk = dict(tk)
        t_qwen = Qwen2Config(**dict(tk.pop("qwen")), **common)
        talker = TalkerConfig(qwen=t_qwen, thinker_hidden=qwen.hidden_size, **tk)
        speech_cfg = SpeechHeadConfig(num_codebooks=1, codebook_size=talker.num_speech_tokens)
    num_emotions = int(model.get("num_emotions", 0))
    if num_emotions not in (0, NUM_EMOTIONS):
        raise ValueError(
            f"model.num_emotions 應為 0（無情緒頭）或 {NUM_EMOTIONS}（labels.EMOTIONS），"
            f"得到 {num_emotions}"
        )
    return SpeakLLMConfig(
        whisper=whisper,
        qwen=qwen,
        connector_stack=int(model.connector.stack),
        connector_hidden=int(model.connector.hidden),
        speech_head=speech_head,
        speech=speech_cfg,
        talker=talker,
        max_chars_per_token=int(model.get("max_chars_per_token", 4)),
        num_emotions=num_emotions,
        **_streaming_fields(model),
    )


def _streaming_fields(model: Any) -> dict[str, int]:
    """`config.model.streaming`（可省略）→ `SpeakLLMConfig` 的長對話欄位。"""
    st = model.get("streaming", None)
    if st is None:
        return {}
    names = {
        "chunk_frames": "stream_chunk_frames",
        "encoder_left_chunks": "encoder_left_chunks",
        "llm_sink_frames": "llm_sink_frames",
        "llm_window_frames": "llm_window_frames",
    }
    out = {field: int(st[key]) for key, field in names.items() if key in st}
    for k, v in out.items():
        if v < 0:
            raise ValueError(f"model.streaming.{k} 不可為負：{v}")
    return out
