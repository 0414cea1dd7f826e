"""CosyVoice2 語音 LM（talker）的 PyTorch 孿生，數值與 `speakllm_jax.models.cosyvoice2_talker` 一致。

模組名稱與官方 `Qwen2LM` 相同（`llm_embedding`、`llm.model`＝`transformers.Qwen2ForCausalLM`、
`llm_decoder`、`speech_embedding`），因此官方 `llm.pt` 可直接
`load_state_dict(torch.load('llm.pt'), strict=False)`（本專案的 `fusion.*` 鍵是額外的；
沒有融合模組時可 `strict=True`）。三種前向與 JAX 版同名同義：`forward_interleaved`、
`forward_frames`、逐幀的 `step`（transformers 的 KV 快取）。

主幹前向與 JAX 相同：位置由注意力遮罩累加（填充處為 1），並傳入自建的 4D 加性遮罩
（因果且只看有效鍵），取最終正規化後的隱狀態（官方 `Qwen2Encoder` 取 `hidden_states[-1]`，
兩者相同）。本檔不匯入 JAX。
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache

# 交錯序列的輸入種類（與 `speakllm_jax.data.interleave` 的 KIND_* 相同）。
KIND_TEXT = 0
KIND_SPEECH = 1
KIND_SOS = 2
KIND_TASK = 3
SOS_INDEX = 0
TASK_INDEX = 1
FUSION_MODES = ("residual", "convex")


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


def _positions(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    m = mask.to(torch.long)
    pos = start + torch.cumsum(m, dim=-1) - 1
    return torch.where(m > 0, pos, torch.ones_like(pos))


class Qwen2Encoder(nn.Module):
    """與官方同名的包裝：`.model` 為 `transformers.Qwen2ForCausalLM`（鍵 `llm.model.*`）。"""

    def __init__(self, config: transformers.Qwen2Config) -> None:
        super().__init__()
        self.model = transformers.Qwen2ForCausalLM(config)


class TorchTalkerFusion(nn.Module):
    """LLaMA-Omni2 式閘控融合（與 JAX `TalkerFusion` 相同）。"""

    def __init__(self, thinker_hidden: int, d_model: int, hidden: int, mode: str) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"未知的 fusion {mode!r}；可用：{FUSION_MODES}")
        self.mode = mode
        self.proj_in = nn.Linear(thinker_hidden, hidden)
        self.proj_out = nn.Linear(hidden, d_model)
        self.gate = nn.Linear(2 * d_model, d_model)

    def forward(self, thinker_hidden: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        r = self.proj_out(torch.relu(self.proj_in(thinker_hidden.to(text_emb.dtype))))
        g = torch.sigmoid(self.gate(torch.cat([r, text_emb], dim=-1)).float())
        r32, e32 = r.float(), text_emb.float()
        out = g * r32 + (1.0 - g) * e32 if self.mode == "convex" else e32 + g * r32
        return out.to(text_emb.dtype)


class CosyVoice2TalkerTorch(nn.Module):
    """CosyVoice2 的 `Qwen2LM`（推論用的前向）加上選擇性的思考者融合。"""

    def __init__(
        self,
        config: transformers.Qwen2Config,
        speech_token_size: int = 6561,
        thinker_hidden: int = 0,
        fusion: str = "residual",
        fusion_hidden: int = 0,
    ) -> None:
        super().__init__()
        d = config.hidden_size
        self.speech_token_size = speech_token_size
        self.num_speech_tokens = speech_token_size + 3
        self.eos_id = speech_token_size
        self.fill_id = speech_token_size + 2
        self.llm_embedding = nn.Embedding(2, d)
        self.llm = Qwen2Encoder(config)
        self.llm_decoder = nn.Linear(d, self.num_speech_tokens)
        self.speech_embedding = nn.Embedding(self.num_speech_tokens, d)
        if thinker_hidden > 0:
            self.fusion = TorchTalkerFusion(
                thinker_hidden, d, fusion_hidden or 2 * thinker_hidden, fusion
            )
        else:
            self.fusion = None

    @classmethod
    def from_hf_dict(cls, qwen: dict[str, Any], **kw: Any) -> CosyVoice2TalkerTorch:
        """由主幹的 HF `config.json` 內容（例如 `speakllm_jax.checkpoints.qwen2_hf.qwen2_config_to_hf`）建立。"""
        return cls(transformers.Qwen2Config(**qwen), **kw)

    # ---------------------------------------------------------------- 嵌入

    @property
    def _dtype(self) -> torch.dtype:
        return self.speech_embedding.weight.dtype

    def text_embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.llm.model.model.embed_tokens
        return emb(ids.long().clamp(0, emb.num_embeddings - 1))

    def speech_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.speech_embedding(ids.long().clamp(0, self.num_speech_tokens - 1))

    def special_embed(self, index: int) -> torch.Tensor:
        return self.llm_embedding.weight[index]

    def fuse(self, thinker_hidden: torch.Tensor | None, text_emb: torch.Tensor) -> torch.Tensor:
        if thinker_hidden is None:
            return text_emb
        if self.fusion is None:
            raise ValueError("此 talker 沒有融合模組（thinker_hidden=0），不能接收思考者隱狀態")
        return self.fusion(thinker_hidden, text_emb)

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm_decoder(hidden).float()

    def backbone(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """無快取前向 → 最終正規化後的隱狀態（位置與遮罩同 JAX）；`window=(sinks, w)` 時第 i 個
        位置只看 `j < sinks` 或 `i - j < w`（長對話方案，同思考者）。"""
        b, t, _ = embeds.shape
        m = (
            torch.ones((b, t), dtype=torch.bool, device=embeds.device)
            if mask is None
            else mask.bool()
        )
        causal = torch.tril(torch.ones((t, t), dtype=torch.bool, device=embeds.device))
        if window is not None:
            i = torch.arange(t, device=embeds.device)
            causal = causal & ((i[None, :] < window[0]) | (i[:, None] - i[None, :] < window[1]))
        bias = _additive((causal[None] & m[:, None, :])[:, None], embeds.dtype)
        out = self.llm.model.model(
            inputs_embeds=embeds, attention_mask=bias, position_ids=_positions(m), use_cache=False
        )
        return out.last_hidden_state

    # ---------------------------------------------------------------- 交錯序列

    def interleaved_inputs(
        self,
        input_ids: torch.Tensor,
        input_kind: torch.Tensor,
        thinker_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kind = input_kind[..., None]
        text = self.fuse(thinker_hidden, self.text_embed(input_ids))
        x = torch.where(kind == KIND_TEXT, text, self.speech_embed(input_ids))
        x = torch.where(kind == KIND_SOS, self.special_embed(SOS_INDEX), x)
        return torch.where(kind == KIND_TASK, self.special_embed(TASK_INDEX), x)

    def forward_interleaved(
        self,
        input_ids: torch.Tensor,
        input_kind: torch.Tensor,
        mask: torch.Tensor | None = None,
        thinker_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """交錯序列 → logits `[B, L, 6564]`（fp32）。"""
        x = self.interleaved_inputs(input_ids, input_kind, thinker_hidden)
        return self.decode(self.backbone(x, mask))

    forward = forward_interleaved

    # ---------------------------------------------------------------- 幀模式

    def frame_inputs(
        self,
        thinker_hidden: torch.Tensor | None,
        text_out: torch.Tensor,
        prev_codes: torch.Tensor,
        prev_valid: torch.Tensor,
    ) -> torch.Tensor:
        text = self.fuse(thinker_hidden, self.text_embed(text_out))
        speech = torch.where(
            prev_valid[..., None].bool(),
            self.speech_embed(prev_codes),
            self.special_embed(SOS_INDEX),
        )
        return (text.float() + speech.float()).to(self._dtype)

    def forward_frames(
        self,
        thinker_hidden: torch.Tensor | None,
        text_out: torch.Tensor,
        prev_codes: torch.Tensor,
        prev_valid: torch.Tensor,
        mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """整段幀模式（幀上因果）→ logits `[B, N, 6564]`（fp32）。"""
        x = self.frame_inputs(thinker_hidden, text_out, prev_codes, prev_valid)
        return self.decode(self.backbone(x, mask, window))

    def new_cache(self) -> Any:
        """空的 transformers KV 快取。"""
        return DynamicCache(config=self.llm.model.config)

    def step(
        self,
        cache: Any,
        thinker_hidden: torch.Tensor | None,
        text_out: torch.Tensor,
        prev_codes: torch.Tensor,
        prev_valid: torch.Tensor,
        position: int | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """一幀（`[B, T]` 輸入）以 KV 快取前向；之前的幀全部有效。回傳（logits, 快取）。

        `position` 為這一段第一幀的 RoPE 位置（預設為快取長度；快取被長對話方案截斷後
        由呼叫端給）。"""
        x = self.frame_inputs(thinker_hidden, text_out, prev_codes, prev_valid)
        b, t, _ = x.shape
        past = cache.get_seq_length()
        start = past if position is None else int(position)
        causal = torch.ones((t, past + t), dtype=torch.bool, device=x.device).tril(past)
        bias = _additive(causal[None, None].expand(b, 1, t, past + t), x.dtype)
        pos = torch.arange(start, start + t, device=x.device)[None].expand(b, t)
        res = self.llm.model.model(
            inputs_embeds=x, attention_mask=bias, position_ids=pos, cache=cache, use_cache=True
        )
        return self.decode(res.last_hidden_state), res.cache

    def greedy_codes(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.speech_token_size].argmax(dim=-1)
