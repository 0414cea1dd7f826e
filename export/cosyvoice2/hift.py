"""CosyVoice2 的 HiFT 聲碼器：NSF 諧波激發源加上 iSTFT 版 HiFi-GAN，80 維梅爾譜 → 24 kHz 波形。

模組名稱與官方 `hift.pt` 的鍵完全一致，`load_state_dict(strict=True)` 可直接載入。
權重正規化採 `torch.nn.utils.parametrizations.weight_norm` 的命名
（`*.parametrizations.weight.original0/original1`），這是目前官方 CosyVoice2-0.5B `hift.pt`
的命名；舊式 `torch.nn.utils.weight_norm` 的 `*.weight_g/weight_v` 由 `load_hift` 轉換後同樣可載入。

形狀：梅爾譜 `[B, 80, T]`（50 Hz）→ 波形 `[B, T * 480]` 與激發源 `[B, 1, T * 480]`。
串流時把上一塊激發源的尾端當成 `cache_source` 傳入，新一塊開頭同長度的激發源會被原樣替換，
避免正弦相位在塊與塊之間跳動。
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from speakllm_jax.checkpoints.state_check import shapes_of, state_dict_problems

# 官方 CosyVoice2-0.5B `cosyvoice2.yaml` 的 hift 參數（f0 預測器參數攤平成 f0_* 欄位）。
HIFT_OFFICIAL: dict[str, Any] = {
    "in_channels": 80,
    "base_channels": 512,
    "nb_harmonics": 8,
    "sampling_rate": 24000,
    "nsf_alpha": 0.1,
    "nsf_sigma": 0.003,
    "nsf_voiced_threshold": 10.0,
    "upsample_rates": (8, 5, 3),
    "upsample_kernel_sizes": (16, 11, 7),
    "istft_n_fft": 16,
    "istft_hop_len": 4,
    "resblock_kernel_sizes": (3, 7, 11),
    "resblock_dilation_sizes": ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    "source_resblock_kernel_sizes": (7, 7, 11),
    "source_resblock_dilation_sizes": ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    "lrelu_slope": 0.1,
    "audio_limit": 0.99,
    "f0_cond_channels": 512,
    "f0_num_class": 1,
    # 正弦產生器版本："2" 是參考實作目前在非 22050 Hz（即 CosyVoice2 的 24 kHz）時所用的
    # 幀率累加相位版本；"1" 是逐取樣點累加相位的舊版本。兩者都沒有參數，不影響權重格式。
    "sinegen_type": "2",
}

# 極小的測試用設定：取樣率與上取樣倍率相同（每個梅爾幀 480 個取樣點），通道數很小。
HIFT_TINY: dict[str, Any] = {
    **HIFT_OFFICIAL,
    "base_channels": 32,
    "f0_cond_channels": 16,
}

# 官方串流（CosyVoice2Model.token2wav）所用的快取長度：保留 8 個梅爾幀與對應的 3840 點激發源。
MEL_CACHE_LEN = 8
SOURCE_CACHE_LEN = MEL_CACHE_LEN * 480

_LEGACY_G = ".weight_g"
_LEGACY_V = ".weight_v"
_PARAM_G = ".parametrizations.weight.original0"
_PARAM_V = ".parametrizations.weight.original1"


def _rand(
    shape: Sequence[int],
    generator: torch.Generator | None,
    like: torch.Tensor,
    normal: bool = False,
) -> torch.Tensor:
    """在產生器所在裝置（無產生器時在 `like` 的裝置）抽取均勻或常態亂數，再搬到 `like` 的裝置。"""
    device = generator.device if generator is not None else like.device
    fn = torch.randn if normal else torch.rand
    out = fn(tuple(shape), generator=generator, dtype=like.dtype, device=device)
    return out.to(like.device)


def _padding(kernel_size: int, dilation: int = 1) -> int:
    """長度不變的一維卷積所需的對稱補零量。"""
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """Snake 週期激活：x + sin²(αx)/α，α 逐通道、線性尺度（形狀 `[C]`）。"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.eps = 1e-9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + self.eps)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN／BigVGAN 殘差塊：每個膨脹率一組（Snake → 膨脹卷積 → Snake → 卷積）並加回輸入。"""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(
                    channels,
                    channels,
                    kernel_size,
                    1,
                    dilation=d,
                    padding=_padding(kernel_size, d),
                )
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(
                    channels, channels, kernel_size, 1, dilation=1, padding=_padding(kernel_size)
                )
            )
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class SineGen(nn.Module):
    """逐取樣點累加相位的正弦產生器（sinegen_type "1"）。

    輸入 `f0: [B, L, 1]`（Hz，已上取樣到波形取樣率），輸出 `(正弦+噪聲 [B, L, H], uv [B, L, 1], 噪聲)`，
    其中 H = 諧波數 + 1。諧波（第 2 個以後）帶 [-π, π) 的隨機初相，基頻初相為 0。
    """

    def __init__(
        self,
        sampling_rate: int,
        harmonic_num: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
    ) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    @torch.no_grad()
    def forward(
        self, f0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f0_t = f0.transpose(1, 2)  # [B, 1, L]
        batch = f0_t.shape[0]
        freq = torch.zeros(batch, self.dim, f0_t.shape[-1], dtype=f0.dtype, device=f0.device)
        for i in range(self.dim):
            freq[:, i : i + 1, :] = f0_t * (i + 1) / self.sampling_rate
        theta = 2 * math.pi * (torch.cumsum(freq, dim=-1) % 1)
        # 與 torch.distributions.Uniform(-π, π) 相同的取樣算式：low + rand * (high - low)。
        low = torch.tensor(-math.pi, dtype=f0.dtype)
        high = torch.tensor(math.pi, dtype=f0.dtype)
        # 參考實作的 Uniform 在 CPU 上抽樣後才搬到 f0 的裝置。
        rand = _rand((batch, self.dim, 1), generator, torch.empty(0, dtype=f0.dtype)).cpu()
        phase = (low + rand * (high - low)).to(f0.device)
        phase[:, 0, :] = 0
        sines = self.sine_amp * torch.sin(theta + phase)
        uv = (f0_t > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * _rand(sines.shape, generator, sines, normal=True)
        sines = sines * uv + noise
        return sines.transpose(1, 2), uv.transpose(1, 2), noise


class SineGen2(nn.Module):
    """在梅爾幀率累加相位、再線性內插回取樣率的正弦產生器（sinegen_type "2"）。

    相位先以線性內插降到幀率（每 `upsample_scale` 點一個值）後累加，再乘以倍率線性內插回取樣率，
    因此相位在幀與幀之間平滑。介面與 `SineGen` 相同。
    """

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
    ) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def _f0_to_sine(self, freqs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        rad = (freqs / self.sampling_rate) % 1  # 每點相位增量（以圈計），整數部分無影響
        rand_ini = _rand((freqs.shape[0], freqs.shape[2]), generator, freqs)
        rand_ini[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad_frames = F.interpolate(
            rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear"
        ).transpose(1, 2)
        phase = torch.cumsum(rad_frames, dim=1) * 2 * math.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample_scale,
            scale_factor=self.upsample_scale,
            mode="linear",
        ).transpose(1, 2)
        return torch.sin(phase)

    @torch.no_grad()
    def forward(
        self, f0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        harmonics = torch.arange(1, self.dim + 1, dtype=f0.dtype, device=f0.device)
        sines = self._f0_to_sine(f0 * harmonics, generator) * self.sine_amp
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        # 參考實作以 randn_like 作用在轉置過的（通道優先記憶體排列）張量上；非連續張量逐元素
        # 依記憶體順序抽樣，這裡建立同樣排列的張量再 normal_，讓同一種子下的噪聲逐點相同。
        b, n, h = sines.shape
        device = generator.device if generator is not None else sines.device
        noise = torch.empty(b, h, n, dtype=sines.dtype, device=device).transpose(1, 2)
        noise = noise_amp * noise.normal_(generator=generator).to(sines.device)
        return sines * uv + noise, uv, noise


class SourceModuleHnNSF(nn.Module):
    """諧波加噪聲的 NSF 激發源：正弦產生器輸出的 H 個諧波經線性層與 tanh 合成單一激發訊號。"""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        add_noise_std: float,
        voiced_threshold: float,
        sinegen_type: str,
    ) -> None:
        super().__init__()
        self.sine_amp = sine_amp
        if sinegen_type == "1":
            self.l_sin_gen: nn.Module = SineGen(
                sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshold
            )
        elif sinegen_type == "2":
            self.l_sin_gen = SineGen2(
                sampling_rate,
                upsample_scale,
                harmonic_num,
                sine_amp,
                add_noise_std,
                voiced_threshold,
            )
        else:
            raise ValueError(f"sinegen_type 必須是 '1' 或 '2'，收到 {sinegen_type!r}")
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(
        self, f0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`f0: [B, L, 1]` → `(激發源 [B, L, 1], 噪聲支路 [B, L, 1], uv [B, L, 1])`。"""
        with torch.no_grad():
            sine_wavs, uv, _ = self.l_sin_gen(f0, generator)
        sine_merge = self.l_tanh(self.l_linear(sine_wavs))
        # 噪聲支路 HiFT 不使用，仍照參考實作抽取，讓同一亂數種子下的亂數序列一致。
        noise = _rand(uv.shape, generator, uv, normal=True) * self.sine_amp / 3
        return sine_merge, noise, uv


class ConvRNNF0Predictor(nn.Module):
    """由梅爾譜預測逐幀基頻：五層 k=3 權重正規化卷積（ELU）加線性分類器，取絕對值。"""

    def __init__(self, num_class: int, in_channels: int, cond_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(
                weight_norm(
                    nn.Conv1d(
                        in_channels if i == 0 else cond_channels,
                        cond_channels,
                        kernel_size=3,
                        padding=1,
                    )
                )
            )
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [B, in_channels, T]` → 基頻 `[B, T]`（Hz）。"""
        h = self.condnet(x).transpose(1, 2)
        return torch.abs(self.classifier(h).squeeze(-1))


def _validate_config(config: Mapping[str, Any]) -> None:
    """檢查設定欄位齊全且彼此一致，錯誤時指出欄位名稱。"""
    missing = sorted(set(HIFT_OFFICIAL) - set(config))
    unknown = sorted(set(config) - set(HIFT_OFFICIAL))
    if missing or unknown:
        raise ValueError(f"HiFT 設定欄位不符：缺少 {missing}，未知 {unknown}")
    n_up = len(config["upsample_rates"])
    if len(config["upsample_kernel_sizes"]) != n_up:
        raise ValueError("HiFT 設定 upsample_kernel_sizes 的長度必須等於 upsample_rates")
    if len(config["resblock_kernel_sizes"]) != len(config["resblock_dilation_sizes"]):
        raise ValueError("HiFT 設定 resblock_kernel_sizes 與 resblock_dilation_sizes 長度不同")
    for name in ("source_resblock_kernel_sizes", "source_resblock_dilation_sizes"):
        if len(config[name]) != n_up:
            raise ValueError(f"HiFT 設定 {name} 的長度必須等於 upsample_rates（{n_up}）")
    if config["f0_num_class"] != 1:
        raise ValueError(f"HiFT 設定 f0_num_class 必須是 1，收到 {config['f0_num_class']}")
    if config["base_channels"] % (2**n_up) != 0:
        raise ValueError(f"HiFT 設定 base_channels 必須能被 {2**n_up} 整除")


class HiFTGenerator(nn.Module):
    """HiFTNet 產生器：梅爾譜 → 基頻 → NSF 激發源；梅爾譜經轉置卷積上取樣並在每層融合激發源的 STFT，
    最後以 iSTFT 輸出波形。子模組名稱與官方 `hift.pt` 相同。"""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        _validate_config(config)
        self.config = dict(config)
        base = int(config["base_channels"])
        rates = [int(r) for r in config["upsample_rates"]]
        n_fft = int(config["istft_n_fft"])
        self.n_fft = n_fft
        self.hop_len = int(config["istft_hop_len"])
        self.lrelu_slope = float(config["lrelu_slope"])
        self.audio_limit = float(config["audio_limit"])
        self.sampling_rate = int(config["sampling_rate"])
        self.num_kernels = len(config["resblock_kernel_sizes"])
        self.num_upsamples = len(rates)
        # 每個梅爾幀對應的波形取樣點數（官方設定為 8*5*3*4 = 480）。
        self.upsample_scale = math.prod(rates) * self.hop_len

        self.m_source = SourceModuleHnNSF(
            sampling_rate=self.sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=int(config["nb_harmonics"]),
            sine_amp=float(config["nsf_alpha"]),
            add_noise_std=float(config["nsf_sigma"]),
            voiced_threshold=float(config["nsf_voiced_threshold"]),
            sinegen_type=str(config["sinegen_type"]),
        )
        self.conv_pre = weight_norm(nn.Conv1d(int(config["in_channels"]), base, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(
                nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            )
            for i, (u, k) in enumerate(zip(rates, config["upsample_kernel_sizes"]))
        )
        # 激發源 STFT（n_fft + 2 個通道：實部與虛部）降到各上取樣層的時間解析度。
        down_rates = [1] + rates[::-1][:-1]
        cum_rates = [math.prod(down_rates[: i + 1]) for i in range(len(down_rates))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(
                cum_rates,
                config["source_resblock_kernel_sizes"],
                config["source_resblock_dilation_sizes"],
            )
        ):
            ch = base // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, int(k), d))
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base // 2 ** (i + 1)
            for k, d in zip(config["resblock_kernel_sizes"], config["resblock_dilation_sizes"]):
                self.resblocks.append(ResBlock(ch, int(k), d))
        self.conv_post = weight_norm(nn.Conv1d(ch, n_fft + 2, 7, 1, padding=3))
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        self.register_buffer(
            "stft_window", torch.hann_window(n_fft, periodic=True), persistent=False
        )
        self.f0_predictor = ConvRNNF0Predictor(
            num_class=int(config["f0_num_class"]),
            in_channels=int(config["in_channels"]),
            cond_channels=int(config["f0_cond_channels"]),
        )

    def fold_weight_norm(self) -> None:
        """把所有權重正規化參數（g·v/‖v‖）折回一般的 `weight`，推論較快；之後狀態字典鍵會改變。"""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_len,
            self.n_fft,
            window=self.stft_window.to(x.device),
            return_complex=True,
        )
        spec = torch.view_as_real(spec)  # [B, F, frames, 2]
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(
            spec, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window.to(spec.device)
        )

    def f0_to_source(
        self, f0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """逐幀基頻 `[B, T]` → 激發源 `[B, 1, T * upsample_scale]`（最近鄰上取樣後產生正弦）。"""
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        source, _, _ = self.m_source(f0_up.transpose(1, 2), generator)
        return source.transpose(1, 2)

    def decode(self, speech_feat: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """梅爾譜 `[B, C, T]` 與激發源 `[B, 1, T * 480]` → 波形 `[B, T * 480]`，振幅截在 ±audio_limit。"""
        s_stft = self._stft(source.squeeze(1))
        x = self.conv_pre(speech_feat)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = self.reflection_pad(x)
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # 參考實作此處用預設斜率 0.01
        x = self.conv_post(x)
        n_bins = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :n_bins, :])
        phase = torch.sin(x[:, n_bins:, :])
        wav = self._istft(magnitude, phase)
        return torch.clamp(wav, -self.audio_limit, self.audio_limit)

    def forward(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """梅爾譜 `[B, in_channels, T]` → `(波形 [B, T*480], 激發源 [B, 1, T*480])`。

        `cache_source: [B, 1, S]`（S ≤ T*480）會原樣覆寫新激發源的前 S 點（串流時傳入上一塊的尾端）。
        正弦初相與噪聲的亂數取自 `generator`；給 `seed` 時建立一個以該種子初始化的 CPU 產生器；
        兩者皆無時使用 torch 的全域亂數（與參考實作相同的抽取順序）。
        """
        if speech_feat.ndim != 3 or speech_feat.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"speech_feat 形狀必須是 [B, {self.config['in_channels']}, T]，"
                f"收到 {tuple(speech_feat.shape)}"
            )
        if generator is not None and seed is not None:
            raise ValueError("generator 與 seed 只能擇一")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        f0 = self.f0_predictor(speech_feat)
        source = self.f0_to_source(f0, generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if (
                cache_source.ndim != 3
                or cache_source.shape[0] != source.shape[0]
                or cache_source.shape[1] != 1
                or n > source.shape[-1]
            ):
                raise ValueError(
                    f"cache_source 形狀必須是 [B={source.shape[0]}, 1, S≤{source.shape[-1]}]，"
                    f"收到 {tuple(cache_source.shape)}"
                )
            source = source.clone()
            source[:, :, :n] = cache_source.to(source.dtype)
        return self.decode(speech_feat, source), source

    @torch.inference_mode()
    def inference(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """推論模式下的 `forward`（不建計算圖）；介面同官方 `HiFTGenerator.inference`。"""
        return self.forward(speech_feat, cache_source, generator=generator, seed=seed)


def _rename_suffixes(
    state: Mapping[str, torch.Tensor], renames: dict[str, str]
) -> dict[str, torch.Tensor]:
    """把以 `renames` 的鍵結尾的名稱換成對應的結尾，其餘不變。"""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def legacy_to_parametrized(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """舊式 `weight_g/weight_v` 鍵 → `parametrizations.weight.original0/original1`，其餘不變。"""
    return _rename_suffixes(state, {_LEGACY_G: _PARAM_G, _LEGACY_V: _PARAM_V})


def parametrized_to_legacy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`parametrizations.weight.original0/original1` 鍵 → 舊式 `weight_g/weight_v`，其餘不變。"""
    return _rename_suffixes(state, {_PARAM_G: _LEGACY_G, _PARAM_V: _LEGACY_V})


def weight_norm_naming(state: Mapping[str, torch.Tensor]) -> str:
    """回報狀態字典採用的權重正規化命名："parametrizations"、"legacy"、"mixed" 或 "none"。"""
    has_param = any(k.endswith((_PARAM_G, _PARAM_V)) for k in state)
    has_legacy = any(k.endswith((_LEGACY_G, _LEGACY_V)) for k in state)
    if has_param and has_legacy:
        return "mixed"
    if has_param:
        return "parametrizations"
    return "legacy" if has_legacy else "none"


def _normalize_state(state: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """去掉官方訓練包裝的 `generator.` 前綴、統一權重正規化命名。"""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: 鍵 {key!r} 不是「字串 → 張量」")
        if key.startswith("generator."):
            key = key[len("generator.") :]
        out[key] = value
    return legacy_to_parametrized(out)


def load_hift(path: str | Path, config: Mapping[str, Any]) -> HiFTGenerator:
    """從官方格式的 `hift.pt`（狀態字典）嚴格載入 HiFT，回傳 eval 模式的模型。

    兩種權重正規化命名都接受；鍵缺漏、多餘或形狀不符時拋出 ValueError 並列出鍵名。
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"找不到 HiFT 權重檔 {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: 內容不是狀態字典（型別 {type(raw).__name__}）")
    state = _normalize_state(raw, str(path))
    model = HiFTGenerator(**config)
    problems = state_dict_problems(shapes_of(state), shapes_of(model.state_dict()))
    if problems:
        raise ValueError(f"{path}: HiFT 權重與設定不符：" + "；".join(problems))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.eval()


def save_random_hift(
    path: str | Path,
    config: Mapping[str, Any],
    seed: int,
    *,
    legacy_weight_norm: bool = False,
) -> None:
    """以隨機權重建立 HiFT，並以官方鍵格式 `torch.save` 其狀態字典（測試用）。

    Snake α 取 [0.5, 1.5)，權重正規化的 g 取正值，基頻分類器偏置設在 100–250 Hz，
    讓隨機模型產生有聲（uv=1）的激發源。`legacy_weight_norm=True` 時改存舊式 `weight_g/weight_v`。
    """
    gen = torch.Generator().manual_seed(int(seed))
    model = HiFTGenerator(**config)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            new = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.startswith("conv_post.") and key.endswith(_PARAM_G):
            # 輸出層的 g 取小值，讓 exp(幅度) 接近 1，波形大多不觸及截幅。
            new = 0.02 + 0.05 * torch.rand(value.shape, generator=gen)
        elif key.endswith(_PARAM_G):
            new = 0.5 + torch.rand(value.shape, generator=gen)
        elif key == "f0_predictor.classifier.bias":
            new = 100.0 + 150.0 * torch.rand(value.shape, generator=gen)
        elif key.endswith(".bias"):
            new = 0.05 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = value[0].numel() if value.ndim > 1 else value.numel()
            new = torch.randn(value.shape, generator=gen) / math.sqrt(max(fan_in, 1))
        out[key] = new.to(torch.float32).contiguous()
    if legacy_weight_norm:
        out = parametrized_to_legacy(out)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
