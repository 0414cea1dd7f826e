"""CosyVoice2 的語音 LM（talker）與思考者–說話者融合（Flax NNX）。

事實（FunAudioLLM/CosyVoice `cosyvoice/llm/llm.py` 的 `Qwen2LM`）：主幹是 Qwen2.5-0.5B
（`Qwen2Encoder` 以 `inputs_embeds` 前向、取最後一層正規化後的隱狀態）；另有
`speech_embedding(6561 + 3, 896)`、`llm_embedding(2, 896)`（第 0 列 sos、第 1 列 task_id）、
`llm_decoder: Linear(896 → 6561 + 3)`（有偏置）。語音詞表中 6561 為 eos、6563 為 fill
（雙流交錯中「換文字」的填充符號），6562 保留未用；三者都是停止符號。
文字以主幹自己的 `embed_tokens` 嵌入（與 Qwen2.5 共用分詞器）。

三種用法：

- 交錯序列（CosyVoice2 訓練序列，見 `speakllm_jax.data.interleave.interleave_fixed`）：
  `forward_interleaved(input_ids, input_kind, mask, thinker_hidden=None)`，依 `input_kind`
  分別查文字、語音、sos／task 嵌入，回傳 `[B, L, 6564]` 的 logits。
- 思考者–說話者融合（LLaMA-Omni2 的閘控融合）：文字位置的輸入改為
  `fusion(思考者隱狀態, 文字嵌入)`。思考者隱狀態先經 `proj_out(relu(proj_in(h)))` 投影到
  talker 寬度 r，閘 g = sigmoid(gate([r; e]))。`fusion="convex"` 與 LLaMA-Omni2 相同：
  g·r + (1 − g)·e；預設 `fusion="residual"`：e + g·r。偏置初始化為 0，所以思考者隱狀態為 0
  時 r = 0，residual 形式精確退化成原本的 CosyVoice2（convex 形式則會把文字嵌入乘上 1 − g，
  不會退化，因此不是預設）。
- 幀模式（全雙工幀模型的說話頭）：第 t 幀的輸入為
  `fusion(h_t, embed(text_out_t)) + speech_embedding(上一幀語音碼)`，上一幀沒有有效語音碼時
  改用 `llm_embedding[sos]`；在幀上因果前向，`forward_frames` 整段、`step` 以 KV 快取逐幀。

參數路徑（亦是 `llm.pt` 鍵對應的依據，見 `speakllm_jax.checkpoints.cosyvoice2_llm`）：
`llm/…`（Qwen2 主幹）、`speech_embedding/embedding`、`llm_embedding/embedding`、
`llm_decoder/{kernel,bias}`、（有融合時）`fusion/{proj_in,proj_out,gate}/{kernel,bias}`。
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from speakllm_jax.labels import KIND_SOS, KIND_TASK, KIND_TEXT
from speakllm_jax.models.attention import KVCache
from speakllm_jax.models.layers import dense, embedding
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

# `llm_embedding` 的列：sos／eos 共用第 0 列，task_id 為第 1 列（與官方相同）。
SOS_INDEX = 0
TASK_INDEX = 1
FUSION_MODES = ("residual", "convex")


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    """talker 設定。

    `qwen`：主幹（官方為 Qwen2.5-0.5B）；`speech_token_size`：語音碼數（官方 6561，
    另加 3 個特殊符號）；`thinker_hidden`：思考者隱狀態寬度（0 表示沒有融合模組）；
    `fusion`：`"residual"` 或 `"convex"`；`fusion_hidden`：投影的中間寬度（0 表示
    2 × thinker_hidden，同 LLaMA-Omni2）。
    """

    qwen: Qwen2Config = dataclasses.field(default_factory=Qwen2Config.qwen2_5_0_5b)
    speech_token_size: int = 6561
    thinker_hidden: int = 0
    fusion: str = "residual"
    fusion_hidden: int = 0

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"未知的 fusion {self.fusion!r}；可用：{FUSION_MODES}")
        if self.speech_token_size <= 0:
            raise ValueError(f"speech_token_size 必須 > 0，收到 {self.speech_token_size}")

    @property
    def num_speech_tokens(self) -> int:
        """語音詞表大小（含 eos、保留、fill 三個特殊符號）。"""
        return self.speech_token_size + 3

    @property
    def eos_id(self) -> int:
        return self.speech_token_size

    @property
    def fill_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def fusion_width(self) -> int:
        return self.fusion_hidden or 2 * self.thinker_hidden

    def replace(self, **kw: Any) -> TalkerConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def cosyvoice2(cls, **kw: Any) -> TalkerConfig:
        """官方 CosyVoice2 的 LM：Qwen2.5-0.5B 主幹、6561 個語音碼。"""
        return cls(qwen=Qwen2Config.qwen2_5_0_5b(), **kw)


class TalkerFusion(nnx.Module):
    """思考者隱狀態與文字嵌入的閘控融合（LLaMA-Omni2）。"""

    def __init__(
        self,
        thinker_hidden: int,
        d_model: int,
        hidden: int,
        mode: str,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        self.dtype = dtype
        self.proj_in = dense(thinker_hidden, hidden, ("embed", "mlp"), **kw)
        self.proj_out = dense(hidden, d_model, ("mlp", "embed"), **kw)
        self.gate = dense(2 * d_model, d_model, ("mlp", "embed"), **kw)

    def __call__(self, thinker_hidden: jax.Array, text_emb: jax.Array) -> jax.Array:
        """`thinker_hidden [..., D]`、`text_emb [..., d]` → `[..., d]`。"""
        e = text_emb.astype(self.dtype)
        r = self.proj_out(jax.nn.relu(self.proj_in(thinker_hidden.astype(self.dtype))))
        g = jax.nn.sigmoid(self.gate(jnp.concatenate([r, e], axis=-1)).astype(jnp.float32))
        r32, e32 = r.astype(jnp.float32), e.astype(jnp.float32)
        if self.mode == "convex":
            out = g * r32 + (1.0 - g) * e32
        else:
            out = e32 + g * r32
        return out.astype(self.dtype)


class CosyVoice2Talker(nnx.Module):
    """CosyVoice2 的語音 LM（Qwen2 主幹 + 語音嵌入／特殊嵌入／語音輸出頭 + 選擇性融合）。"""

    def __init__(self, cfg: TalkerConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        q = cfg.qwen
        d = q.hidden_size
        kw = dict(dtype=q.dtype, param_dtype=q.param_dtype)
        self.llm = Qwen2ForCausalLM(q, rngs=rngs)
        self.speech_embedding = embedding(cfg.num_speech_tokens, d, rngs=rngs, **kw)
        self.llm_embedding = embedding(2, d, (None, "embed"), rngs=rngs, **kw)
        self.llm_decoder = dense(d, cfg.num_speech_tokens, ("embed", "vocab"), rngs=rngs, **kw)
        if cfg.thinker_hidden > 0:
            self.fusion = TalkerFusion(
                cfg.thinker_hidden, d, cfg.fusion_width, cfg.fusion, rngs=rngs, **kw
            )
        else:
            self.fusion = None

    # ---------------------------------------------------------------- 嵌入

    def text_embed(self, ids: jax.Array) -> jax.Array:
        """文字符號 → 主幹的 `embed_tokens`（編號夾在詞表範圍內）。"""
        ids = jnp.clip(ids.astype(jnp.int32), 0, self.cfg.qwen.vocab_size - 1)
        return self.llm.embed(ids)

    def speech_embed(self, ids: jax.Array) -> jax.Array:
        """語音碼（含特殊符號）→ `speech_embedding`。"""
        ids = jnp.clip(ids.astype(jnp.int32), 0, self.cfg.num_speech_tokens - 1)
        return self.speech_embedding(ids).astype(self.cfg.qwen.dtype)

    def special_embed(self, index: int) -> jax.Array:
        """`llm_embedding` 的一列（`SOS_INDEX` 或 `TASK_INDEX`）→ `[d]`。"""
        return self.llm_embedding.embedding[index].astype(self.cfg.qwen.dtype)

    def fuse(self, thinker_hidden: jax.Array | None, text_emb: jax.Array) -> jax.Array:
        """有思考者隱狀態時做閘控融合，否則原樣回傳文字嵌入。"""
        if thinker_hidden is None:
            return text_emb
        if self.fusion is None:
            raise ValueError("此 talker 沒有融合模組（thinker_hidden=0），不能接收思考者隱狀態")
        return self.fusion(thinker_hidden, text_emb)

    def decode(self, hidden: jax.Array) -> jax.Array:
        """主幹隱狀態 → 語音詞表 logits（fp32）。"""
        return self.llm_decoder(hidden).astype(jnp.float32)

    # ---------------------------------------------------------------- 交錯序列

    def interleaved_inputs(
        self,
        input_ids: jax.Array,
        input_kind: jax.Array,
        thinker_hidden: jax.Array | None = None,
    ) -> jax.Array:
        """`input_ids [B, L]`、`input_kind [B, L]`（KIND_*）→ 主幹輸入 `[B, L, d]`。

        sos／task 位置不看編號，直接取 `llm_embedding` 的第 0／1 列。`thinker_hidden [B, L, D]`
        只在文字位置使用。
        """
        kind = input_kind[..., None]
        text = self.fuse(thinker_hidden, self.text_embed(input_ids))
        speech = self.speech_embed(input_ids)
        x = jnp.where(kind == KIND_TEXT, text, speech)
        x = jnp.where(kind == KIND_SOS, self.special_embed(SOS_INDEX), x)
        x = jnp.where(kind == KIND_TASK, self.special_embed(TASK_INDEX), x)
        return x

    def forward_interleaved(
        self,
        input_ids: jax.Array,
        input_kind: jax.Array,
        mask: jax.Array | None = None,
        thinker_hidden: jax.Array | None = None,
    ) -> jax.Array:
        """交錯序列前向 → logits `[B, L, 6564]`（fp32）；`mask [B, L]` 為 1/0（右填充）。"""
        x = self.interleaved_inputs(input_ids, input_kind, thinker_hidden)
        hidden, _ = self.llm.forward_embeds(x, attention_mask=mask)
        return self.decode(hidden)

    # ---------------------------------------------------------------- 幀模式

    def frame_inputs(
        self,
        thinker_hidden: jax.Array | None,
        text_out: jax.Array,
        prev_codes: jax.Array,
        prev_valid: jax.Array,
    ) -> jax.Array:
        """第 t 幀輸入：fusion(h_t, embed(text_out_t)) + 上一幀語音碼嵌入（無效時為 sos 列）。

        `thinker_hidden [B, N, D]`（可為 None：不融合）、`text_out [B, N]`、`prev_codes [B, N]`、
        `prev_valid [B, N]` → `[B, N, d]`。
        """
        text = self.fuse(thinker_hidden, self.text_embed(text_out))
        speech = jnp.where(
            prev_valid[..., None].astype(bool),
            self.speech_embed(prev_codes),
            self.special_embed(SOS_INDEX),
        )
        return (text.astype(jnp.float32) + speech.astype(jnp.float32)).astype(self.cfg.qwen.dtype)

    def forward_frames(
        self,
        thinker_hidden: jax.Array | None,
        text_out: jax.Array,
        prev_codes: jax.Array,
        prev_valid: jax.Array,
        mask: jax.Array | None = None,
        window: tuple[int, int] | None = None,
    ) -> jax.Array:
        """整段幀模式前向（幀上因果）→ logits `[B, N, 6564]`（fp32）；`window=(sinks, w)` 為與
        思考者相同的長對話遮罩（見 `Qwen2ForCausalLM.forward_embeds`）。"""
        x = self.frame_inputs(thinker_hidden, text_out, prev_codes, prev_valid)
        hidden, _ = self.llm.forward_embeds(x, attention_mask=mask, window=window)
        return self.decode(hidden)

    def init_cache(
        self,
        batch: int,
        max_len: int,
        *,
        window: tuple[int, int] | None = None,
    ) -> KVCache:
        """幀模式串流用的空 KV 快取；`window` 時為有界的環狀快取（同思考者）。"""
        return self.llm.init_cache(batch, max_len, window=window)

    def step(
        self,
        cache: KVCache,
        thinker_hidden: jax.Array | None,
        text_out: jax.Array,
        prev_codes: jax.Array,
        prev_valid: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """一幀（或一小段）以 KV 快取前向：各輸入為 `[B, T]`（隱狀態 `[B, T, D]`）。

        回傳（logits `[B, T, 6564]`, 更新後的快取）；逐幀呼叫的結果與 `forward_frames` 相同。
        """
        x = self.frame_inputs(thinker_hidden, text_out, prev_codes, prev_valid)
        hidden, cache = self.llm.forward_embeds(x, cache=cache)
        return self.decode(hidden), cache

    def greedy_codes(self, logits: jax.Array) -> jax.Array:
        """幀模式的貪婪選碼：只在一般語音碼（< speech_token_size）中取最大者。"""
        return jnp.argmax(logits[..., : self.cfg.speech_token_size], axis=-1).astype(jnp.int32)

    def __call__(
        self,
        hidden: jax.Array,
        codes_target: jax.Array,
        text_out: jax.Array,
        prev_codes: jax.Array | None = None,
        prev_valid: jax.Array | None = None,
        mask: jax.Array | None = None,
        window: tuple[int, int] | None = None,
    ) -> jax.Array:
        """全雙工模型的說話頭介面：回傳 `[B, N, 1, 6564]`（與深度 Transformer 的輸出同形）。

        `hidden [B, N, D]` 思考者每幀隱狀態；`codes_target [B, N, 1]` 這一幀的目標語音碼；
        `text_out [B, N]` 思考者這一幀輸出的文字符號。`prev_codes`／`prev_valid [B, N]`
        未給時由目標右移一幀得到（第 0 幀無效）。
        """
        if prev_codes is None:
            tgt = codes_target[..., 0]
            prev_codes = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
            prev_valid = jnp.arange(tgt.shape[1])[None, :] > 0
            prev_valid = jnp.broadcast_to(prev_valid, tgt.shape)
        elif prev_valid is None:
            raise ValueError("給了 prev_codes 就必須同時給 prev_valid")
        logits = self.forward_frames(hidden, text_out, prev_codes, prev_valid, mask, window)
        return logits[:, :, None]
