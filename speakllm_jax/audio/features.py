"""Whisper 對數梅爾頻譜（numpy 與 jnp 兩種實作，數值與 `transformers.WhisperFeatureExtractor` 一致）。

處理流程與 `WhisperFeatureExtractor` 相同：

- 16 kHz 單聲道波形；`pad_to_seconds` 給定時以零補齊或截斷到該長度（預設 30 秒 = 480000 樣本）。
- STFT：`n_fft=400`、`hop=160`、週期性 Hann 窗、兩端各以反射方式補 `n_fft // 2`
  （即 `torch.stft(center=True, pad_mode="reflect")`），得到 `1 + L // 160` 個框，
  再丟掉最後一框，所以框數為 `L // 160`（30 秒時為 3000）。
- 功率譜乘上 Slaney 梅爾濾波器（0–8000 Hz，Slaney 刻度與 Slaney 面積正規化），
  取 `log10(max(mel, 1e-10))`。
- 每一筆（整段、含補零區域）以其最大值減 8 為下限截斷，最後 `(x + 4) / 4`。

jnp 版在第一次呼叫時才匯入 JAX：只用 numpy 版的程式（例如 PyTorch 服務端）不會載入 JAX。

批次時各筆各自計算最大值（與 transformers 的批次 torch 路徑相同）。
`pad_to_seconds=None` 時不補齊也不截斷，等同 `WhisperFeatureExtractor(..., padding="longest",
truncation=False)` 對單筆輸入的結果。
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from speakllm_jax.audio.constants import HOP_LENGTH, N_FFT, SAMPLE_RATE

if TYPE_CHECKING:
    import jax


CHUNK_SECONDS = 30.0
LOG_FLOOR = 1e-10


# ---------------------------------------------------------------- 梅爾濾波器


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney 刻度：1 kHz 以下線性、以上對數。"""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    logstep = 27.0 / np.log(6.4)
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-30) / 1000.0) * logstep, mels)


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), freq)


@functools.lru_cache(maxsize=16)
def _mel_filters_f64(n_mels: int, sr: int, n_fft: int) -> np.ndarray:
    n_freq = 1 + n_fft // 2
    mel_min = _hz_to_mel_slaney(np.float64(0.0))
    mel_max = _hz_to_mel_slaney(np.float64(sr / 2))
    mel_pts = np.linspace(mel_min, mel_max, n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fft_freqs = np.linspace(0, sr // 2, n_freq)
    # 三角濾波器：對每個頻率點取上升與下降斜率的較小者，負值截為零。
    diff = np.diff(hz_pts)
    slopes = hz_pts[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    # Slaney 面積正規化：每個濾波器的能量大致相同。
    enorm = 2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels])
    fb = fb * enorm[None, :]
    out = np.ascontiguousarray(fb.T)
    out.setflags(write=False)
    return out


def mel_filters(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney 梅爾濾波器組，形狀 `[n_mels, 1 + n_fft // 2]`（float64）。

    與 `transformers.audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")`
    的結果互為轉置（transformers 為 `[頻率, 梅爾]`）。
    """
    if n_mels <= 0 or n_fft <= 0 or sr <= 0:
        raise ValueError(f"mel_filters 參數必須為正：n_mels={n_mels} sr={sr} n_fft={n_fft}")
    return np.array(_mel_filters_f64(int(n_mels), int(sr), int(n_fft)))


@functools.lru_cache(maxsize=4)
def _hann(n_fft: int) -> np.ndarray:
    # 週期性 Hann 窗，與 `torch.hann_window(n_fft)` 相同。
    n = np.arange(n_fft, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)
    w.setflags(write=False)
    return w


# ---------------------------------------------------------------- 長度


def frames_for_samples(n: int, hop: int = HOP_LENGTH) -> int:
    """`n` 個樣本得到的梅爾框數（丟掉最後一框後）：`n // hop`。"""
    if n < 0:
        raise ValueError(f"樣本數不可為負：{n}")
    return int(n) // hop


def valid_frames_for_samples(n: int, hop: int = HOP_LENGTH) -> int:
    """補齊批次中一筆原長 `n` 樣本所對應的有效框數。

    與 `WhisperFeatureExtractor(return_attention_mask=True)` 的框遮罩相同：
    樣本遮罩每 `hop` 取一點，故為 `ceil(n / hop)`（再由呼叫端截到總框數）。
    """
    if n < 0:
        raise ValueError(f"樣本數不可為負：{n}")
    return math.ceil(int(n) / hop)


def _target_samples(n: int, pad_to_seconds: float | None) -> int:
    if pad_to_seconds is None:
        return int(n)
    if pad_to_seconds <= 0:
        raise ValueError(f"pad_to_seconds 必須為正或 None，收到 {pad_to_seconds}")
    return int(round(pad_to_seconds * SAMPLE_RATE))


def _check_length(n: int) -> None:
    if n <= N_FFT // 2:
        raise ValueError(
            f"音訊太短：{n} 個樣本；反射補邊需要多於 {N_FFT // 2} 個樣本（約 12.5 毫秒）"
        )


# ---------------------------------------------------------------- numpy 版


def _fit_length_np(audio: np.ndarray, target: int) -> np.ndarray:
    n = audio.shape[-1]
    if n == target:
        return audio
    if n > target:
        return audio[..., :target]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, target - n)]
    return np.pad(audio, pad)


def log_mel_np(
    audio: np.ndarray,
    n_mels: int = 80,
    pad_to_seconds: float | None = CHUNK_SECONDS,
) -> np.ndarray:
    """單筆波形 `[samples]` → 對數梅爾 `[n_mels, frames]` float32（以 float64 計算）。"""
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"log_mel_np 需要一維波形，收到形狀 {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"波形必須為浮點數（-1..1），收到型別 {x.dtype}")
    x = x.astype(np.float32).astype(np.float64)
    x = _fit_length_np(x, _target_samples(x.shape[0], pad_to_seconds))
    _check_length(x.shape[0])
    half = N_FFT // 2
    padded = np.pad(x, (half, half), mode="reflect")
    n_frames = 1 + x.shape[0] // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:n_frames]
    spec = np.fft.rfft(frames * _hann(N_FFT), axis=-1)
    power = spec.real**2 + spec.imag**2  # [frames, freq]
    mel = _mel_filters_f64(n_mels, SAMPLE_RATE, N_FFT) @ power[:-1].T  # [n_mels, frames-1]
    log_spec = np.log10(np.maximum(mel, LOG_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


class IncrementalLogMel:
    """逐段收到的 16 kHz 波形 → 因果的對數梅爾框（串流用），記憶體有界。

    框 t 的 STFT 窗（補邊座標 `[160t, 160t + 400)`）完全落在已收到的音訊內才輸出，輸出後不再
    改變；開頭與 `log_mel_np` 相同以反射補邊，`finish()` 以反射補右端並輸出剩下的框，總框數為
    `樣本數 // 160`，未截斷的 log10 梅爾與 `log_mel_np(audio, pad_to_seconds=None)` 逐框相同。
    正規化是因果的：下限為目前為止輸出過的框（含這一批）的最大值減 8，而不是整段的最大值；
    整段最大聲的框出現之後兩者相同。只保留還沒輸出的框需要的樣本。
    """

    def __init__(self, n_mels: int = 80) -> None:
        if n_mels <= 0:
            raise ValueError(f"n_mels 必須為正，收到 {n_mels}")
        self.n_mels = int(n_mels)
        self.filters = _mel_filters_f64(self.n_mels, SAMPLE_RATE, N_FFT)
        self.window = _hann(N_FFT)
        self.head = np.zeros(0, np.float64)  # 反射補邊前（≤ n_fft/2 個樣本）先存在這裡
        self.buf = np.zeros(0, np.float64)  # 補邊座標中第 `frames` 框起的樣本
        self.frames = 0  # 已輸出的框數
        self.samples = 0  # 已收到的樣本數
        self.peak = -np.inf

    @property
    def buffered_samples(self) -> int:
        """目前保留的樣本數（有界：少於一個窗加上最近一段輸入）。"""
        return int((0 if self.head is None else self.head.size) + self.buf.size)

    def _emit(self, padded: np.ndarray, count: int) -> np.ndarray:
        # 與 `log_mel_np` 的 sliding_window_view 取到同樣的框；直接 as_strided 省下每次約 12 µs 的檢查
        # （每幀每個會話呼叫一次）。框數不超過 `padded` 容得下的（同 sliding_window_view 的切片）。
        count = min(count, (padded.size - N_FFT) // HOP_LENGTH + 1)
        if count <= 0:
            return np.zeros((self.n_mels, 0), np.float32)
        step = padded.strides[0]
        frames = np.lib.stride_tricks.as_strided(
            padded, (count, N_FFT), (HOP_LENGTH * step, step), writeable=False
        )
        spec = np.fft.rfft(frames * self.window, axis=-1)
        power = spec.real**2 + spec.imag**2
        log_spec = np.log10(np.maximum(self.filters @ power.T, LOG_FLOOR))
        self.peak = max(self.peak, float(log_spec.max()))
        self.frames += count
        log_spec = np.maximum(log_spec, self.peak - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)

    def push(self, audio: np.ndarray) -> np.ndarray:
        """餵一段波形（float，-1..1）→ 這次新確定的梅爾框 `[n_mels, k]`（k 可為 0）。"""
        x = np.asarray(audio)
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"IncrementalLogMel 需要一維浮點波形，收到 {x.shape} {x.dtype}")
        x = x.astype(np.float32).astype(np.float64)
        self.samples += x.size
        half = N_FFT // 2
        if self.head is not None:
            self.head = np.concatenate([self.head, x])
            if self.head.size <= half:
                return np.zeros((self.n_mels, 0), np.float32)
            self.buf = np.concatenate([self.head[1 : half + 1][::-1], self.head])
            self.head = None
        else:
            self.buf = np.concatenate([self.buf, x])
        count = (self.buf.size - N_FFT) // HOP_LENGTH + 1 if self.buf.size >= N_FFT else 0
        out = self._emit(self.buf, count)
        self.buf = self.buf[count * HOP_LENGTH :]
        return out

    def finish(self) -> np.ndarray:
        """音訊結束：以反射補右端，輸出剩下的框（之後不可再 `push`）。"""
        half = N_FFT // 2
        if self.head is not None:  # 不到 n_fft/2 個樣本：與 log_mel_np 一樣無法反射補邊
            return np.zeros((self.n_mels, 0), np.float32)
        padded = np.concatenate([self.buf, self.buf[-2 : -half - 2 : -1]])
        out = self._emit(padded, self.samples // HOP_LENGTH - self.frames)
        self.buf = np.zeros(0, np.float64)
        return out


# ---------------------------------------------------------------- jnp 版


@functools.cache
def _log_mel_jnp_jit() -> Any:
    """jit 過的 jnp 實作（第一次呼叫時才匯入 JAX 並建立）。"""
    # 延後匯入：服務路徑匯入本模組，模組層級不可載入 JAX
    import jax

    return jax.jit(_log_mel_jnp_impl, static_argnames=("n_mels", "target"))


def _log_mel_jnp_impl(x: jax.Array, n_mels: int, target: int) -> jax.Array:
    # 延後匯入：服務路徑匯入本模組，模組層級不可載入 JAX
    import jax
    import jax.numpy as jnp

    n = x.shape[-1]
    if n > target:
        x = x[:, :target]
    elif n < target:
        x = jnp.pad(x, ((0, 0), (0, target - n)))
    half = N_FFT // 2
    padded = jnp.pad(x, ((0, 0), (half, half)), mode="reflect")
    n_frames = target // HOP_LENGTH  # 已丟掉最後一框
    idx = np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]
    frames = padded[:, idx]  # [B, frames, n_fft]
    window = jnp.asarray(_hann(N_FFT), dtype=jnp.float32)
    spec = jnp.fft.rfft(frames * window, axis=-1)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    filters = jnp.asarray(_mel_filters_f64(n_mels, SAMPLE_RATE, N_FFT), dtype=jnp.float32)
    mel = jnp.einsum("mf,btf->bmt", filters, power, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, LOG_FLOOR))
    peak = jnp.max(log_spec, axis=(1, 2), keepdims=True)
    log_spec = jnp.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_jnp(
    audio: jax.Array | np.ndarray,
    n_mels: int = 80,
    pad_to_seconds: float | None = CHUNK_SECONDS,
) -> jax.Array:
    """jnp 版對數梅爾：`[samples]` → `[n_mels, frames]`，或 `[B, samples]` → `[B, n_mels, frames]`。

    以 float32 計算；`n_mels` 與 `pad_to_seconds` 為靜態值，可在 `jax.jit` 內呼叫。
    批次中每筆各自以其最大值截斷（與 transformers 相同）。
    """
    # 延後匯入：服務路徑匯入本模組，模組層級不可載入 JAX
    import jax.numpy as jnp

    x = jnp.asarray(audio)
    if x.ndim not in (1, 2):
        raise ValueError(f"log_mel_jnp 需要 [samples] 或 [B, samples]，收到形狀 {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"波形必須為浮點數（-1..1），收到型別 {x.dtype}")
    single = x.ndim == 1
    xb = x[None] if single else x
    target = _target_samples(xb.shape[-1], pad_to_seconds)
    _check_length(target)
    out = _log_mel_jnp_jit()(xb.astype(jnp.float32), n_mels=int(n_mels), target=int(target))
    return out[0] if single else out


# ---------------------------------------------------------------- 批次前端


@dataclass(frozen=True)
class WhisperFrontend:
    """把長度不一的多筆波形組成 `[B, n_mels, frames]` 特徵與 `[B, frames]` 框遮罩。

    - `pad_to_seconds` 給定時（預設 30 秒）每筆補齊／截斷到該長度，框數固定（30 秒為 3000）。
    - `pad_to_seconds=None` 時補到批次中最長的一筆（等同 transformers 的 `padding="longest"`）；
      `pad_to_multiple_frames` 再把框數向上補到該倍數，讓 jit 的形狀種類有限。
    - 補零在計算頻譜之前進行，所以每筆的「最大值減 8」截斷是對含補零的整段計算，
      與 `WhisperFeatureExtractor` 對補齊批次的行為一致。
    - 框遮罩：第 j 框有效若且唯若 `j < ceil(原樣本數 / 160)`，與 transformers 的
      `return_attention_mask=True` 相同。
    - `use_jax=True` 時以 `log_mel_jnp` 計算，否則以 `log_mel_np`。
    """

    n_mels: int = 80
    pad_to_seconds: float | None = CHUNK_SECONDS
    pad_to_multiple_frames: int | None = None
    use_jax: bool = False

    def target_samples(self, lengths: Sequence[int]) -> int:
        """此批次補齊後的樣本數。"""
        if self.pad_to_seconds is not None:
            return _target_samples(0, self.pad_to_seconds)
        longest = max(int(n) for n in lengths)
        if self.pad_to_multiple_frames:
            step = self.pad_to_multiple_frames * HOP_LENGTH
            longest = -(-longest // step) * step
        return longest

    def __call__(self, waveforms: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if len(waveforms) == 0:
            raise ValueError("WhisperFrontend 收到空的波形清單")
        arrays = []
        for i, w in enumerate(waveforms):
            a = np.asarray(w)
            if a.ndim != 1:
                raise ValueError(f"第 {i} 筆波形必須是一維，收到形狀 {a.shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"第 {i} 筆波形必須為浮點數，收到型別 {a.dtype}")
            arrays.append(a.astype(np.float32))
        lengths = [a.shape[0] for a in arrays]
        target = self.target_samples(lengths)
        batch = np.stack([_fit_length_np(a, target) for a in arrays])
        if self.use_jax:
            feats = np.asarray(log_mel_jnp(batch, self.n_mels, pad_to_seconds=None))
        else:
            feats = np.stack([log_mel_np(a, self.n_mels, pad_to_seconds=None) for a in batch])
        n_frames = feats.shape[-1]
        valid = np.minimum([valid_frames_for_samples(n) for n in lengths], n_frames)
        mask = np.arange(n_frames)[None, :] < valid[:, None]
        return feats.astype(np.float32), mask
