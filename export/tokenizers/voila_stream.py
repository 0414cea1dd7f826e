"""Voila-Tokenizer（因果 `transformers.EncodecModel`）的有狀態串流解碼器（PyTorch 端）。

`VoilaStreamDecoder` 一次吃每個串流的一幀（或幾幀）語音碼，解出這些幀的 `hop`（640）個樣本，
並在 `VoilaStreamState` 裡為每個串流保留解碼器的內部狀態：

- 每個因果卷積（`EncodecConv1d`，步幅 1）的左方脈絡：最近 `padding_total = (k − 1) · dilation`
  個輸入；
- 每個轉置卷積（`EncodecConvTranspose1d`，`trim_right_ratio = 1`）的重疊尾端：這一段輸入對之後
  `kernel − stride` 個輸出的貢獻（不含偏置），下一段的輸出加上它；
- LSTM 每層的 (h, c)。

權重直接用 `transformers` 模型裡的模組（`layer.conv`、`layer.lstm`、ELU）；weight norm 算好的卷積
權重記下來重用（原始參數 g、v 的版本改變時重算），小卷積以矩陣乘法算（`_conv_matmul`）。

串流的開頭：`transformers` 的因果卷積在序列開頭以 `config.pad_mode`（預設 "reflect"）補左邊。
這裡對每個新串流第一次送進來的那一段，以同一個 `EncodecConv1d._pad1d` 補出左方脈絡，所以：

- 整段一次送進來 = `decode_codes` 整段（任何長度，含短序列時 transformers 先補零再反射的規則）；
- 第一段至少 `exact_start_frames` 幀（每個卷積的第一段都比它的補邊長，反射只讀到這一段）、之後
  逐幀 = `decode_codes` 整段，逐樣本相同（浮點誤差內）；
- 從第一幀起逐幀送：幀率上的卷積（第一個轉置卷積之前，一幀只有 1 個位置）在開頭讀不到反射要的
  未來幀，transformers 對 1 個位置的反射補邊（先補零）得到全零，所以等同把這些卷積改成
  `pad_mode="constant"` 的整段解碼；之後的卷積一幀有多個位置，開頭的反射照常、與整段相同。
  反射補邊讀的是未來的幀，逐幀串流要與它逐樣本相同只能延後 `exact_start_frames − 1` 幀出聲，
  服務端選擇不延後（差異只來自開頭這幾個補邊，經 LSTM 逐漸衰減）。

只支援因果（`use_causal_conv=True`）、weight norm、`trim_right_ratio = 1` 的設定（Voila 與示範
分詞器都是）；其他設定在建構時拒絕。
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.models.encodec.modeling_encodec import (
    EncodecConv1d,
    EncodecConvTranspose1d,
    EncodecLSTM,
    EncodecModel,
    EncodecResnetBlock,
)


@dataclass
class VoilaStreamState:
    """B 個串流的解碼器狀態：每個張量的第 0 維是串流（列）。

    `fresh[b]` 為真的列還沒解過任何幀：它的左方脈絡在第一次解碼時由那一段補出，重疊尾端與 LSTM
    狀態為零。列可以合併（`cat`）、挑選（`select`）、拆開（`split`）與重設（`reset`）。
    """

    fresh: torch.Tensor
    tensors: dict[str, torch.Tensor]
    any_fresh: bool = True  # 解碼時一次算好的 `fresh.any()`（每個卷積都要問）

    def __len__(self) -> int:
        return int(self.fresh.shape[0])

    @staticmethod
    def cat(states: Sequence[VoilaStreamState]) -> VoilaStreamState:
        """依序合併幾個狀態的列（會話加入批次）。"""
        if not states:
            raise ValueError("cat 需要至少一個狀態")
        keys = states[0].tensors.keys()
        return VoilaStreamState(
            torch.cat([s.fresh for s in states]),
            {k: torch.cat([s.tensors[k] for s in states]) for k in keys},
        )

    def select(self, rows: Sequence[int] | torch.Tensor) -> VoilaStreamState:
        """只留 `rows` 這些列（依給的順序；會話離開時用）。"""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.fresh.device)
        return VoilaStreamState(
            self.fresh.index_select(0, idx),
            {k: v.index_select(0, idx) for k, v in self.tensors.items()},
        )

    def split(self) -> list[VoilaStreamState]:
        """拆成每列一個的狀態（`cat` 的反向；各列是這一批張量的檢視，不複製）。"""
        keys = list(self.tensors)
        parts = [self.fresh.split(1)] + [self.tensors[k].split(1) for k in keys]
        return [
            VoilaStreamState(row[0], dict(zip(keys, row[1:], strict=True)))
            for row in zip(*parts, strict=True)
        ]

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """把 `rows`（預設全部）重設成新串流（新的一輪從頭解碼）。"""
        # 換成新張量而不就地改：解碼在 `torch.inference_mode` 裡產生的狀態不能在模式外就地修改。
        hit = torch.zeros_like(self.fresh)
        hit[slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)] = True
        self.fresh = self.fresh | hit
        for k, v in self.tensors.items():
            self.tensors[k] = v.masked_fill(hit.view(-1, *([1] * (v.ndim - 1))), 0)
        self.any_fresh = True


def _conv_matmul(conv: nn.Conv1d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """步幅 1、不補邊的 `conv1d`，以一次矩陣乘法算（各延遲的輸入疊成 `[B, C·k, L]`）。

    解碼器的卷積很小（幾到幾十個通道、一幀 1–640 個位置），`conv1d` 每次呼叫的固定成本
    （oneDNN）比計算本身大；結果與 `conv1d` 相同（浮點誤差內，約 1e-6）。"""
    d = int(conv.dilation[0])
    out_ch, in_ch, k = w.shape
    if conv.groups != 1 or int(conv.stride[0]) != 1 or conv.padding not in ((0,), 0):
        return conv(x)
    length = x.shape[-1] - (k - 1) * d
    if k == 1:
        y = torch.matmul(w[:, :, 0], x)
    else:
        taps = torch.stack([x[..., j * d : j * d + length] for j in range(k)], dim=2)
        y = torch.matmul(w.reshape(out_ch, in_ch * k), taps.reshape(x.shape[0], in_ch * k, length))
    return y if conv.bias is None else y + conv.bias[:, None]


def _conv_transpose_matmul(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """不含偏置的 `conv_transpose1d(x, weight, stride=stride)`：一次矩陣乘法得到每個輸入位置對
    `kernel` 個輸出的貢獻，再以 `stride` 為塊重疊相加（同 `_conv_matmul`，小張量時省下固定成本）。"""
    b, in_ch, t = x.shape
    out_ch, k = weight.shape[1], weight.shape[2]
    m = -(-k // stride)  # 一個輸入位置蓋到幾個輸出塊
    z = torch.matmul(x.transpose(1, 2), weight.reshape(in_ch, out_ch * k))  # [B, T, O·k]
    z = z.view(b, t, out_ch, k).permute(0, 2, 1, 3)  # [B, O, T, k]
    if m * stride > k:
        z = nn.functional.pad(z, (0, m * stride - k))
    z = z.reshape(b, out_ch, t, m, stride)
    y = z.new_zeros((b, out_ch, t + m - 1, stride))
    for j in range(m):
        y[:, :, j : j + t] += z[:, :, :, j]
    return y.reshape(b, out_ch, (t + m - 1) * stride)[..., : (t - 1) * stride + k]


class VoilaStreamDecoder:
    """因果 `EncodecModel` 解碼器的串流版本：每次解碼幾幀，狀態在 `VoilaStreamState`。"""

    def __init__(self, model: EncodecModel) -> None:
        cfg = model.config
        if not cfg.use_causal_conv:
            raise ValueError("串流解碼需要因果卷積（config.use_causal_conv=True）")
        if cfg.norm_type != "weight_norm":
            raise ValueError(f"串流解碼不支援 norm_type={cfg.norm_type!r}（整段的群組正規化）")
        if float(cfg.trim_right_ratio) != 1.0:
            raise ValueError(f"串流解碼需要 trim_right_ratio=1.0，收到 {cfg.trim_right_ratio}")
        if cfg.chunk_length_s is not None:
            raise ValueError("串流解碼不支援切塊（config.chunk_length_s 應為 None）")
        self.model = model
        self.num_codebooks_max = int(cfg.num_quantizers)
        self.hop = int(np.prod(cfg.upsampling_ratios))
        self._names = {id(m): n for n, m in model.decoder.named_modules()}
        self._weights: dict[int, tuple[tuple, torch.Tensor]] = {}
        # 每個有狀態模組的狀態形狀（不含列）；同時算出逐幀時開頭反射能否與整段相同。
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pads: dict[str, int] = {}
        self.exact_start_frames = 1
        rate = 1  # 目前這一層一幀有幾個位置
        for layer in model.decoder.layers:
            rate = self._plan(layer, rate)
        if rate != self.hop:
            raise RuntimeError(f"解碼器的上取樣 {rate} 與 hop {self.hop} 不符")

    # ---------------------------------------------------------------- 建構

    def _plan(self, layer: nn.Module, rate: int) -> int:
        name = self._names[id(layer)]
        if isinstance(layer, EncodecConv1d):
            if int(layer.stride) != 1:
                raise ValueError(f"{name}：串流解碼只支援步幅 1 的卷積")
            pad = int(layer.padding_total)
            self._pads[name] = pad
            if pad > 0:
                self._shapes[name] = (layer.conv.in_channels, pad)
                # 第一段在這一層有 frames × rate 個位置，要比補邊長，反射才只讀到這一段。
                self.exact_start_frames = max(self.exact_start_frames, pad // rate + 1)
            return rate
        if isinstance(layer, EncodecConvTranspose1d):
            k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
            if k > s:
                self._shapes[name] = (layer.conv.out_channels, k - s)
            return rate * s
        if isinstance(layer, EncodecLSTM):
            lstm = layer.lstm
            self._shapes[name + ".h"] = (lstm.num_layers, lstm.hidden_size)
            self._shapes[name + ".c"] = (lstm.num_layers, lstm.hidden_size)
            return rate
        if isinstance(layer, EncodecResnetBlock):
            for sub in layer.block:
                self._plan(sub, rate)
            self._plan(layer.shortcut, rate)
            return rate
        if isinstance(layer, nn.ELU | nn.Identity):
            return rate
        raise TypeError(f"串流解碼不認得的解碼器模組：{name}（{type(layer).__name__}）")

    def _weight(self, conv: nn.Module) -> torch.Tensor:
        """卷積的權重（weight norm 算好的）：記下來重用，原始參數（g、v）改變時才重算。"""
        if not parametrize.is_parametrized(conv, "weight"):
            return conv.weight
        originals = tuple(conv.parametrizations.weight._parameters.values())
        key = tuple((t.data_ptr(), t._version) for t in originals)
        got = self._weights.get(id(conv))
        if got is None or got[0] != key:
            got = self._weights[id(conv)] = (key, conv.weight.detach())
        return got[1]

    def new_state(self, batch: int = 1) -> VoilaStreamState:
        """`batch` 個新串流的狀態（全為零、`fresh`）。"""
        p = next(self.model.decoder.parameters())
        return VoilaStreamState(
            torch.ones(batch, dtype=torch.bool, device=p.device),
            {
                k: torch.zeros((batch, *shape), dtype=p.dtype, device=p.device)
                for k, shape in self._shapes.items()
            },
        )

    # ---------------------------------------------------------------- 解碼

    def decode(self, state: VoilaStreamState, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """每列接著解 `codes` `[B, Q, T]` 的 T 幀，回傳 `[B, T * hop]` float32 並更新 `state`。"""
        # 檢查在 numpy 上做（torch 對小整數張量的 min／max 每次呼叫的固定成本比解碼一個卷積還高）。
        c = codes.cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
        if c.ndim != 3 or c.shape[0] != len(state) or c.shape[2] < 1:
            raise ValueError(f"碼的形狀應為 [{len(state)}, Q, T≥1]，收到 {tuple(c.shape)}")
        if not 1 <= c.shape[1] <= self.num_codebooks_max:
            raise ValueError(f"碼本層數 {c.shape[1]} 不在 1..{self.num_codebooks_max}")
        size = int(self.model.config.codebook_size)
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"碼必須在 [0, {size})，收到範圍 [{lo}, {hi}]")
        p = next(self.model.decoder.parameters())
        c = torch.from_numpy(c.astype(np.int64)).to(device=p.device)
        state.any_fresh = bool(state.fresh.any())
        with torch.inference_mode(), parametrize.cached():
            x = self.model.quantizer.decode(c.transpose(0, 1))  # [B, D, T]
            for layer in self.model.decoder.layers:
                x = self._run(layer, x, state)
        state.fresh.zero_()
        return x[:, 0].to(torch.float32).cpu().numpy()

    def _run(self, layer: nn.Module, x: torch.Tensor, st: VoilaStreamState) -> torch.Tensor:
        if isinstance(layer, EncodecConv1d):
            return self._conv(layer, x, st)
        if isinstance(layer, EncodecConvTranspose1d):
            return self._conv_transpose(layer, x, st)
        if isinstance(layer, EncodecLSTM):
            return self._lstm(layer, x, st)
        if isinstance(layer, EncodecResnetBlock):
            h = x
            for sub in layer.block:
                h = self._run(sub, h, st)
            return self._run(layer.shortcut, x, st) + h
        return layer(x)

    def _conv(self, layer: EncodecConv1d, x: torch.Tensor, st: VoilaStreamState) -> torch.Tensor:
        name = self._names[id(layer)]
        pad = self._pads[name]
        if pad == 0:
            return _conv_matmul(layer.conv, x, self._weight(layer.conv))
        ctx = st.tensors[name]
        if st.any_fresh:
            # 新串流的左方脈絡：與 transformers 整段解碼時對這一段的補邊相同。
            start = layer._pad1d(x, (pad, 0), mode=layer.pad_mode)[..., :pad]
            ctx = torch.where(st.fresh[:, None, None], start, ctx)
        full = torch.cat([ctx, x], dim=-1)
        st.tensors[name] = full[..., -pad:].contiguous()
        return _conv_matmul(layer.conv, full, self._weight(layer.conv))

    def _conv_transpose(
        self, layer: EncodecConvTranspose1d, x: torch.Tensor, st: VoilaStreamState
    ) -> torch.Tensor:
        name = self._names[id(layer)]
        conv = layer.conv
        s = conv.stride[0]
        y = _conv_transpose_matmul(x, self._weight(conv), s)
        n = x.shape[-1] * s
        if name in st.tensors:
            tail = st.tensors[name]
            over = tail.shape[-1]
            y = torch.cat([y[..., :over] + tail, y[..., over:]], dim=-1)
            st.tensors[name] = y[..., n:].contiguous()
        out = y[..., :n]
        if conv.bias is not None:
            out = out + conv.bias[None, :, None]
        return out

    def _lstm(self, layer: EncodecLSTM, x: torch.Tensor, st: VoilaStreamState) -> torch.Tensor:
        name = self._names[id(layer)]
        seq = x.permute(2, 0, 1)  # [T, B, C]
        h0 = st.tensors[name + ".h"].transpose(0, 1).contiguous()
        c0 = st.tensors[name + ".c"].transpose(0, 1).contiguous()
        out, (h, c) = layer.lstm(seq, (h0, c0))
        st.tensors[name + ".h"] = h.transpose(0, 1).contiguous()
        st.tensors[name + ".c"] = c.transpose(0, 1).contiguous()
        return (out + seq).permute(1, 2, 0)
