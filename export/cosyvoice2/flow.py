"""CosyVoice2 的流匹配（flow）模型：25 Hz 語音 token → 50 Hz、80 維 mel。

結構與官方 `CausalMaskedDiffWithXvec` 相同，模組與參數名稱逐一對齊官方 `flow.pt`，
因此 `model.load_state_dict(torch.load("flow.pt"), strict=True)` 可直接讀入官方權重：

- `input_embedding`：token 嵌入（6561 × 512）。
- `spk_embed_affine_layer`：x-vector（192 維，先做 L2 正規化）→ 80 維說話者條件。
- `encoder`：`UpsampleConformerEncoder`，線性嵌入 + 預看（pre-lookahead）卷積 + 6 層
  相對位置 Conformer，之後以最近鄰 ×2 上採樣加因果卷積，再 4 層 Conformer，變成 50 Hz。
- `encoder_proj`：512 → 80，作為流匹配的條件 `mu`。
- `decoder.estimator`：因果 U-Net 速度場估計器（`CausalConditionalDecoder`），
  輸入為噪聲、`mu`、說話者向量與提示 mel 四者在通道上相接（4 × 80 = 320）。

推論以 Euler 法解 ODE（預設 10 步、cosine 時間排程、CFG 比例 0.7）。起始噪聲取自
以固定種子產生的一段長噪聲的前綴，因此一次算完與分段串流所用的噪聲逐格相同；預設
種子 0 與官方 `set_all_random_seed(0)` 後的 `torch.randn([1, 80, 15000])` 完全一致。
串流時編碼器與估計器都使用分塊因果注意力遮罩（token 端 `static_chunk_size`，
mel 端乘上 `token_mel_ratio`），且最後 `pre_lookahead_len` 個 token 只當右側脈絡，
不產生輸出（`finalize=False`）。
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speakllm_jax.checkpoints.state_check import shapes_of, state_dict_problems

__all__ = [
    "FLOW_OFFICIAL",
    "FLOW_TINY",
    "CausalConditionalCFM",
    "CausalConditionalDecoder",
    "FlowConfig",
    "FlowModel",
    "UpsampleConformerEncoder",
    "build_flow",
    "chunk_attention_mask",
    "flow_config",
    "load_flow",
    "save_random_flow",
]

# 注意力遮罩換成加性偏置時使用的大負數（與官方估計器相同）。
_MASK_BIAS = -1.0e10


def dataclass_from_dict(cls: Any, data: Any, where: str) -> Any:
    """由 JSON 物件建立設定資料類別；不是物件或有未知欄位時以清楚的錯誤（指名來源）拒絕。"""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: 需要 JSON 物件，收到 {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: 未知欄位 {unknown}；可用欄位為 {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class FlowConfig:
    """flow 模型的超參數；預設值即 CosyVoice2-0.5B 官方設定（cosyvoice2.yaml）。"""

    vocab_size: int = 6561
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_blocks: int = 6
    encoder_up_blocks: int = 4
    static_chunk_size: int = 25
    estimator_channels: tuple[int, ...] = (256,)
    estimator_blocks: int = 4
    estimator_mid_blocks: int = 12
    estimator_heads: int = 8
    estimator_head_dim: int = 64
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    noise_seed: int = 0
    max_noise_frames: int = 15000

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "estimator_channels", tuple(int(c) for c in self.estimator_channels)
        )
        positive = [
            "vocab_size",
            "input_size",
            "output_size",
            "spk_embed_dim",
            "token_mel_ratio",
            "encoder_heads",
            "encoder_linear_units",
            "static_chunk_size",
            "estimator_heads",
            "estimator_head_dim",
            "max_noise_frames",
        ]
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"FlowConfig.{name} 必須為正整數，收到 {getattr(self, name)!r}")
        for name in ["pre_lookahead_len", "encoder_blocks", "encoder_up_blocks", "n_timesteps"]:
            if int(getattr(self, name)) < 0:
                raise ValueError(f"FlowConfig.{name} 不可為負，收到 {getattr(self, name)!r}")
        if self.input_size % self.encoder_heads != 0:
            raise ValueError(
                f"FlowConfig.input_size={self.input_size} 必須能被 encoder_heads="
                f"{self.encoder_heads} 整除"
            )
        if self.input_size % 2 != 0:
            raise ValueError(f"FlowConfig.input_size={self.input_size} 必須為偶數（正弦位置編碼）")
        if not self.estimator_channels or min(self.estimator_channels) <= 0:
            raise ValueError(
                f"FlowConfig.estimator_channels 必須是非空的正整數序列，收到 {self.estimator_channels!r}"
            )
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(
                f"FlowConfig.t_scheduler 只支援 'cosine' 或 'linear'，收到 {self.t_scheduler!r}"
            )
        if self.inference_cfg_rate < 0:
            raise ValueError(
                f"FlowConfig.inference_cfg_rate 不可為負，收到 {self.inference_cfg_rate}"
            )

    @property
    def estimator_in_channels(self) -> int:
        """估計器輸入通道：噪聲、mu、說話者向量、提示 mel 各 `output_size`。"""
        return 4 * self.output_size

    def to_dict(self) -> dict[str, Any]:
        """轉成可寫入 JSON 的字典。"""
        out = asdict(self)
        out["estimator_channels"] = list(self.estimator_channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "flow config") -> FlowConfig:
        """由字典建立；未知欄位會以清楚的錯誤列出。"""
        return dataclass_from_dict(cls, data, where)


FLOW_OFFICIAL: dict[str, Any] = FlowConfig().to_dict()
"""CosyVoice2-0.5B 官方 flow 設定。"""

FLOW_TINY: dict[str, Any] = FlowConfig(
    input_size=32,
    encoder_heads=2,
    encoder_linear_units=64,
    encoder_blocks=1,
    encoder_up_blocks=1,
    static_chunk_size=10,
    estimator_channels=(32,),
    estimator_blocks=1,
    estimator_mid_blocks=1,
    estimator_heads=2,
    estimator_head_dim=16,
    n_timesteps=4,
).to_dict()
"""測試用的極小設定（鍵名結構與官方相同，只是層數與寬度縮小）。"""


def flow_config(config: FlowConfig | dict[str, Any] | str | None = None) -> FlowConfig:
    """把 `None`／`"official"`／`"tiny"`／字典／`FlowConfig` 統一成 `FlowConfig`。"""
    if config is None or config == "official":
        return FlowConfig()
    if config == "tiny":
        return FlowConfig.from_dict(FLOW_TINY)
    if isinstance(config, FlowConfig):
        return config
    if isinstance(config, dict):
        return FlowConfig.from_dict(config)
    raise ValueError(
        f"無法辨識的 flow 設定：{config!r}（可用 'official'、'tiny'、字典或 FlowConfig）"
    )


def chunk_attention_mask(
    length: int, chunk_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """分塊因果注意力遮罩 `(1, T, T)`：第 i 格可看到其所在區塊結尾以前的所有位置。"""
    pos = torch.arange(length, device=device)
    limit = (torch.div(pos, chunk_size, rounding_mode="floor") + 1) * chunk_size
    return (pos.unsqueeze(0) < limit.unsqueeze(1)).unsqueeze(0)


def _relative_position_table(
    length: int, dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """ESPnet 式相對位置編碼 `(1, 2T-1, dim)`；第 k 列對應相對距離 `T-1-k`（正值表示鍵在左側）。"""
    rel = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim)
    )
    table = torch.zeros(2 * length - 1, dim, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(rel * div)
    table[:, 1::2] = torch.cos(rel * div)
    return table.unsqueeze(0).to(dtype)


class _Transpose(nn.Module):
    """交換第 1、2 維（通道與時間），放在 Sequential 中以保持官方的索引編號。"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


# ---------------------------------------------------------------- 編碼器


class _LinearEmbed(nn.Module):
    """線性 + LayerNorm，再乘上 sqrt(d)（對應官方 `LinearNoSubsampling` + 相對位置編碼）。"""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(0.0)
        )
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class _RelPositionSelfAttention(nn.Module):
    """Transformer-XL 式相對位置多頭自注意力（含 pos_bias_u / pos_bias_v）。"""

    def __init__(self, n_head: int, n_feat: int) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))
        position = torch.matmul(q_v, p.transpose(-2, -1))
        # 把「對相對距離的分數」(2T-1 欄) 取成「對鍵位置的分數」：距離 i-j 在第 T-1-i+j 欄。
        rows = torch.arange(t, device=x.device)
        index = (t - 1 - rows.unsqueeze(1) + rows.unsqueeze(0)).expand(b, self.h, t, t)
        position = torch.gather(position, -1, index)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~mask.unsqueeze(1)
        scores = scores.masked_fill(blocked, float("-inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class _PositionwiseFeedForward(nn.Module):
    """兩層前饋網路，Swish（SiLU）啟動。"""

    def __init__(self, idim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class _ConformerLayer(nn.Module):
    """前置 LayerNorm 的 Conformer 層（官方設定未用卷積模組與 macaron 前饋）。"""

    def __init__(self, size: int, heads: int, linear_units: int) -> None:
        super().__init__()
        self.self_attn = _RelPositionSelfAttention(heads, size)
        self.feed_forward = _PositionwiseFeedForward(size, linear_units)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class _PreLookaheadLayer(nn.Module):
    """預看卷積：每個 token 看到右邊 `pre_lookahead_len` 個 token，之後接因果卷積與殘差。"""

    def __init__(self, channels: int, pre_lookahead_len: int) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)
        if context is not None and context.size(1) > 0:
            if context.size(1) > self.pre_lookahead_len:
                raise ValueError(
                    f"右側脈絡長度 {context.size(1)} 超過 pre_lookahead_len={self.pre_lookahead_len}"
                )
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
            h = F.pad(h, (0, self.pre_lookahead_len - context.size(1)))
        else:
            h = F.pad(h, (0, self.pre_lookahead_len))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (self.conv2.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2) + x


class _RepeatUpsample(nn.Module):
    """最近鄰重複 ×stride 後接左側補零的因果卷積（25 Hz → 50 Hz）。"""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.repeat_interleave(x, self.stride, dim=2)
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    """token 編碼器：Conformer（25 Hz）→ ×`token_mel_ratio` 上採樣 → Conformer（50 Hz）。"""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        size = config.input_size
        self.static_chunk_size = config.static_chunk_size
        self.embed = _LinearEmbed(size, size)
        self.pre_lookahead_layer = _PreLookaheadLayer(size, config.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            [
                _ConformerLayer(size, config.encoder_heads, config.encoder_linear_units)
                for _ in range(config.encoder_blocks)
            ]
        )
        self.up_layer = _RepeatUpsample(size, config.token_mel_ratio)
        self.up_embed = _LinearEmbed(size, size)
        self.up_encoders = nn.ModuleList(
            [
                _ConformerLayer(size, config.encoder_heads, config.encoder_linear_units)
                for _ in range(config.encoder_up_blocks)
            ]
        )
        self.after_norm = nn.LayerNorm(size, eps=1e-5)

    def _mask(self, length: int, chunk: int, streaming: bool, device: torch.device) -> torch.Tensor:
        if streaming:
            return chunk_attention_mask(length, chunk, device)
        return torch.ones(1, 1, length, dtype=torch.bool, device=device)

    def forward(
        self, xs: torch.Tensor, context: torch.Tensor | None = None, streaming: bool = False
    ) -> torch.Tensor:
        """`xs`: `(B, T, C)` token 嵌入；`context`: `(B, L, C)` 右側預看 token 嵌入或 None。"""
        length = xs.size(1)
        xs = self.embed(xs)
        if context is not None and context.size(1) > 0:
            context = self.embed(context)
        pos = _relative_position_table(length, xs.size(2), xs.dtype, xs.device)
        mask = self._mask(length, self.static_chunk_size, streaming, xs.device)
        xs = self.pre_lookahead_layer(xs, context)
        for layer in self.encoders:
            xs = layer(xs, mask, pos)
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        length = xs.size(1)
        xs = self.up_embed(xs)
        pos = _relative_position_table(length, xs.size(2), xs.dtype, xs.device)
        mask = self._mask(
            length, self.static_chunk_size * self.up_layer.stride, streaming, xs.device
        )
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos)
        return self.after_norm(xs)


# ---------------------------------------------------------------- 估計器（U-Net）


class _CausalConv1d(nn.Conv1d):
    """只在左側補零的一維卷積（步長 1）。"""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class _CausalBlock1D(nn.Module):
    """因果卷積 → 通道 LayerNorm → Mish；索引 0 與 2 存放參數，與官方相同。"""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _CausalConv1d(dim, dim_out, 3),
            _Transpose(),
            nn.LayerNorm(dim_out),
            _Transpose(),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class _CausalResnetBlock1D(nn.Module):
    """兩個因果區塊，中間加上時間嵌入，外加 1×1 卷積殘差。"""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = _CausalBlock1D(dim, dim_out)
        self.block2 = _CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class _Downsample1D(nn.Module):
    """步長 2 的卷積降採樣（只在多層 channels 時使用；官方設定只有一層，不會用到）。"""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample1D(nn.Module):
    """轉置卷積 ×2 上採樣（與 `_Downsample1D` 成對）。"""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Attention(nn.Module):
    """diffusers 式自注意力：q/k/v 無偏置，輸出投影放在 `to_out.0`。"""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        for layer in self.to_out:
            out = layer(out)
        return out


class _GeluProjection(nn.Module):
    """線性投影後接精確 GELU（diffusers `GELU` 啟動層）。"""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    """前饋網路（擴張 4 倍）：`net.0` 投影＋GELU、`net.1` dropout、`net.2` 輸出投影。"""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [_GeluProjection(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _TransformerBlock(nn.Module):
    """前置 LayerNorm 的自注意力 + 前饋區塊（無交叉注意力，故沒有 norm2／attn2）。"""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class _TimestepEmbedding(nn.Module):
    """時間步的兩層 MLP（SiLU）。"""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _sinusoidal_time(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """時間步的正弦嵌入（前半 sin、後半 cos），t 先乘上 1000。"""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
    )
    arg = scale * t.float().unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat([arg.sin(), arg.cos()], dim=-1).to(t.dtype)


class CausalConditionalDecoder(nn.Module):
    """因果 U-Net 速度場估計器：每個解析度一個 ResNet 區塊 + 數個 Transformer 區塊。"""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        channels = tuple(config.estimator_channels)
        self.in_channels = config.estimator_in_channels
        self.out_channels = config.output_size
        self.static_chunk_size = config.static_chunk_size * config.token_mel_ratio
        time_dim = channels[0] * 4
        self.time_mlp = _TimestepEmbedding(self.in_channels, time_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    _TransformerBlock(dim, config.estimator_heads, config.estimator_head_dim)
                    for _ in range(config.estimator_blocks)
                ]
            )

        self.down_blocks = nn.ModuleList()
        out_ch = self.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            is_last = i == len(channels) - 1
            down = _CausalConv1d(out_ch, out_ch, 3) if is_last else _Downsample1D(out_ch)
            self.down_blocks.append(
                nn.ModuleList(
                    [_CausalResnetBlock1D(in_ch, out_ch, time_dim), transformers(out_ch), down]
                )
            )
        self.mid_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        _CausalResnetBlock1D(channels[-1], channels[-1], time_dim),
                        transformers(channels[-1]),
                    ]
                )
                for _ in range(config.estimator_mid_blocks)
            ]
        )
        self.up_blocks = nn.ModuleList()
        rev = channels[::-1] + (channels[0],)
        for i in range(len(rev) - 1):
            in_ch, out_ch = rev[i] * 2, rev[i + 1]
            is_last = i == len(rev) - 2
            up = _CausalConv1d(out_ch, out_ch, 3) if is_last else _Upsample1D(out_ch)
            self.up_blocks.append(
                nn.ModuleList(
                    [_CausalResnetBlock1D(in_ch, out_ch, time_dim), transformers(out_ch), up]
                )
            )
        self.final_block = _CausalBlock1D(rev[-1], rev[-1])
        self.final_proj = nn.Conv1d(rev[-1], self.out_channels, 1)

    def _attention_bias(
        self, mask: torch.Tensor, streaming: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        length = mask.size(-1)
        allowed = mask.bool().expand(-1, length, -1)
        if streaming:
            allowed = allowed & chunk_attention_mask(length, self.static_chunk_size, mask.device)
        # 全被遮住的列（只會出現在補齊的位置）改成全可見，避免 softmax 出現 NaN。
        empty = allowed.sum(dim=-1, keepdim=True) == 0
        allowed = allowed | empty
        return (1.0 - allowed.to(dtype)) * _MASK_BIAS

    def _run_transformers(
        self, x: torch.Tensor, blocks: nn.ModuleList, mask: torch.Tensor, streaming: bool
    ) -> torch.Tensor:
        x = x.transpose(1, 2)
        bias = self._attention_bias(mask, streaming, x.dtype)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        """`x`/`mu`/`cond`: `(B, 80, T)`；`mask`: `(B, 1, T)`；`t`: `(B,)`；`spks`: `(B, 80)`。"""
        temb = self.time_mlp(_sinusoidal_time(t, self.in_channels))
        length = x.size(-1)
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, length), cond], dim=1)
        hiddens = []
        masks = [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            h = resnet(h, m, temb)
            h = self._run_transformers(h, blocks, m, streaming)
            hiddens.append(h)
            h = down(h * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            h = resnet(h, m, temb)
            h = self._run_transformers(h, blocks, m, streaming)
        for resnet, blocks, up in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            h = torch.cat([h[:, :, : skip.size(-1)], skip], dim=1)
            h = resnet(h, m, temb)
            h = self._run_transformers(h, blocks, m, streaming)
            h = up(h * m)
        h = self.final_block(h, m)
        return self.final_proj(h * m) * mask


class CausalConditionalCFM(nn.Module):
    """條件流匹配的 ODE 解算器（Euler），帶無分類器引導（CFG）。參數全在 `estimator` 之下。"""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.t_scheduler = config.t_scheduler
        self.estimator = CausalConditionalDecoder(config)

    def time_span(self, n_timesteps: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """0→1 的時間點；cosine 排程為 `1 - cos(t·π/2)`，前段步子較小。"""
        span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
        if self.t_scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        return span

    def forward(
        self,
        noise: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int,
        cfg_rate: float,
        streaming: bool = False,
    ) -> torch.Tensor:
        """由 `noise`（t=0）積分到 t=1，回傳 `(B, 80, T)` 的 mel。"""
        x = noise
        span = self.time_span(n_timesteps, mu.device, mu.dtype)
        if n_timesteps == 0:
            return x.float()
        t, dt = span[0], span[1] - span[0]
        for step in range(1, len(span)):
            if cfg_rate > 0:
                # 有條件與無條件（mu、說話者、提示全為零）兩路一起算。
                v = self.estimator(
                    torch.cat([x, x]),
                    torch.cat([mask, mask]),
                    torch.cat([mu, torch.zeros_like(mu)]),
                    t.expand(2),
                    torch.cat([spks, torch.zeros_like(spks)]),
                    torch.cat([cond, torch.zeros_like(cond)]),
                    streaming=streaming,
                )
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond
            else:
                v = self.estimator(
                    x, mask, mu, t.expand(x.size(0)), spks, cond, streaming=streaming
                )
            x = x + dt * v
            t = t + dt
            if step < len(span) - 1:
                dt = span[step + 1] - t
        return x.float()


# ---------------------------------------------------------------- 整體模型


def _as_tokens(value: Any, name: str, vocab_size: int, device: torch.device) -> torch.Tensor:
    """把 token 序列轉成 `(1, T)` int64 張量並檢查範圍。"""
    if value is None:
        return torch.zeros(1, 0, dtype=torch.long, device=device)
    if isinstance(value, torch.Tensor):
        tokens = value.detach().to(device=device, dtype=torch.long)
    else:
        tokens = torch.as_tensor(np.asarray(value, dtype=np.int64), device=device)
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2 or tokens.size(0) != 1:
        raise ValueError(
            f"{name}: 需要形狀 (T,) 或 (1, T) 的 token 序列，收到 {tuple(tokens.shape)}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{name}: token 必須在 [0, {vocab_size}) 內，收到範圍 "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    return tokens


class FlowModel(nn.Module):
    """CosyVoice2 flow（`CausalMaskedDiffWithXvec`）：token + 提示 + x-vector → mel。"""

    def __init__(self, config: FlowConfig | dict[str, Any] | str | None = None) -> None:
        super().__init__()
        self.config = flow_config(config)
        cfg = self.config
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.input_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg)
        self._noise: torch.Tensor | None = None

    @property
    def token_mel_ratio(self) -> int:
        return self.config.token_mel_ratio

    @property
    def pre_lookahead_len(self) -> int:
        return self.config.pre_lookahead_len

    def noise(self, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """固定種子噪聲的前 `frames` 格 `(1, 80, frames)`；同一模型每次呼叫取到的前綴相同。"""
        cfg = self.config
        if frames > cfg.max_noise_frames:
            raise ValueError(
                f"mel 長度 {frames} 格超過 max_noise_frames={cfg.max_noise_frames}"
                f"（約 {cfg.max_noise_frames / 50:.0f} 秒）；請分段或調大設定"
            )
        if self._noise is None:
            gen = torch.Generator().manual_seed(cfg.noise_seed)
            self._noise = torch.randn(
                [1, cfg.output_size, cfg.max_noise_frames], generator=gen, dtype=torch.float32
            )
        return self._noise[:, :, :frames].to(device=device, dtype=dtype)

    @torch.inference_mode()
    def inference(
        self,
        tokens: Any,
        prompt_tokens: Any = None,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        *,
        finalize: bool = True,
        streaming: bool = False,
        n_timesteps: int | None = None,
        cfg_rate: float | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """產生 mel `(1, 80, ratio × T')`，T' 為 `tokens` 長度（`finalize=False` 時扣掉預看數）。

        `prompt_mel` 形狀 `(1, ratio × Tp, 80)`，需與 `prompt_tokens`（Tp 個）對齊；
        `embedding` 為 `(1, spk_embed_dim)` x-vector（None 視為全零）。`streaming=True`
        使用分塊因果遮罩；`finalize=False` 時最後 `pre_lookahead_len` 個 token 只當脈絡。
        """
        cfg = self.config
        param = self.input_embedding.weight
        device, dtype = param.device, param.dtype
        tokens = _as_tokens(tokens, "tokens", cfg.vocab_size, device)
        prompt_tokens = _as_tokens(prompt_tokens, "prompt_tokens", cfg.vocab_size, device)
        n_prompt = prompt_tokens.size(1)
        if prompt_mel is None:
            prompt_mel = torch.zeros(1, 0, cfg.output_size, device=device, dtype=dtype)
        prompt_mel = torch.as_tensor(prompt_mel).to(device=device, dtype=dtype)
        if prompt_mel.ndim != 3 or prompt_mel.size(0) != 1 or prompt_mel.size(2) != cfg.output_size:
            raise ValueError(
                f"prompt_mel: 需要形狀 (1, T, {cfg.output_size})，收到 {tuple(prompt_mel.shape)}"
            )
        if prompt_mel.size(1) != cfg.token_mel_ratio * n_prompt:
            raise ValueError(
                f"prompt_mel 有 {prompt_mel.size(1)} 格，但 prompt_tokens 有 {n_prompt} 個；"
                f"需剛好 {cfg.token_mel_ratio} 倍（可先用 align_prompt 裁齊）"
            )
        if embedding is None:
            embedding = torch.zeros(1, cfg.spk_embed_dim, device=device, dtype=dtype)
        embedding = torch.as_tensor(embedding).to(device=device, dtype=dtype)
        if embedding.ndim == 1:
            embedding = embedding.unsqueeze(0)
        if tuple(embedding.shape) != (1, cfg.spk_embed_dim):
            raise ValueError(
                f"embedding: 需要形狀 (1, {cfg.spk_embed_dim})，收到 {tuple(embedding.shape)}"
            )
        lookahead = 0 if finalize else cfg.pre_lookahead_len
        if tokens.size(1) < lookahead:
            raise ValueError(
                f"finalize=False 時 tokens 至少要有 pre_lookahead_len={lookahead} 個，收到 {tokens.size(1)}"
            )
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        emb = self.input_embedding(torch.cat([prompt_tokens, tokens], dim=1))
        if lookahead:
            h = self.encoder(emb[:, :-lookahead], emb[:, -lookahead:], streaming=streaming)
        else:
            h = self.encoder(emb, None, streaming=streaming)
        frames = h.size(1)
        n_prompt_mel = prompt_mel.size(1)
        mu = self.encoder_proj(h).transpose(1, 2)
        cond = torch.zeros(1, cfg.output_size, frames, device=device, dtype=dtype)
        cond[:, :, :n_prompt_mel] = prompt_mel.transpose(1, 2)
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        noise = self.noise(frames, device, dtype) * temperature
        mel = self.decoder(
            noise,
            mu,
            mask,
            spks,
            cond,
            n_timesteps=cfg.n_timesteps if n_timesteps is None else int(n_timesteps),
            cfg_rate=cfg.inference_cfg_rate if cfg_rate is None else float(cfg_rate),
            streaming=streaming,
        )
        return mel[:, :, n_prompt_mel:].float()


def align_prompt(
    prompt_tokens: Any, prompt_mel: torch.Tensor, token_mel_ratio: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """把提示 token 與提示 mel 裁成剛好 `token_mel_ratio` 倍（與官方前端相同的做法）。"""
    tokens = torch.as_tensor(np.asarray(prompt_tokens, dtype=np.int64)).reshape(1, -1)
    mel = torch.as_tensor(prompt_mel)
    if mel.ndim != 3 or mel.size(0) != 1:
        raise ValueError(f"prompt_mel: 需要形狀 (1, T, 80)，收到 {tuple(mel.shape)}")
    n = min(mel.size(1) // token_mel_ratio, tokens.size(1))
    return tokens[:, :n], mel[:, : token_mel_ratio * n]


def build_flow(config: FlowConfig | dict[str, Any] | str | None = None) -> FlowModel:
    """依設定建立隨機初始化、處於 eval 模式的 flow 模型。"""
    return FlowModel(config).eval()


def load_flow(
    path: str | Path,
    config: FlowConfig | dict[str, Any] | str | None = None,
    map_location: str | torch.device = "cpu",
) -> FlowModel:
    """嚴格讀入官方格式的 `flow.pt`（純 state_dict）；鍵名或形狀不符時列出差異並拋出 ValueError。"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"找不到 flow 檢查點：{path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: 需要 state_dict（鍵 → 張量的字典），收到 {type(state).__name__}")
    model = build_flow(config)
    expected = model.state_dict()
    problems = state_dict_problems(shapes_of(state), shapes_of(expected), limit=12)
    if problems:
        head = f"{path}: flow 檢查點與設定不符（模型 {len(expected)} 個鍵，檔案 {len(state)} 個鍵）"
        raise ValueError("；".join([head, *problems]))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def save_random_flow(
    path: str | Path, config: FlowConfig | dict[str, Any] | str | None = "tiny", seed: int = 0
) -> Path:
    """以固定種子建立隨機 flow 模型，用官方格式（`torch.save(state_dict)`）寫到 `path`。"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_flow(config)
        # LayerNorm 預設為 1/0；加一點擾動，讓讀檔測試也能檢驗這些參數確實被讀入。
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.add_(0.05 * torch.randn_like(module.weight))
                    module.bias.add_(0.05 * torch.randn_like(module.bias))
    torch.save(model.state_dict(), path)
    return path
