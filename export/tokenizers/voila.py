"""Voila-Tokenizer（Hugging Face `EncodecModel`）的 4 層 RVQ 碼抽取與解碼回波形（PyTorch 端）。

Voila-Tokenizer（maitrix-org/Voila-Tokenizer）是 `transformers.EncodecModel`：16 kHz 單聲道、
`upsampling_ratios` 乘積 640 → 每秒 25 框、每層碼本 2048（11 位元）。使用幾層碼本由頻寬決定，
與 `transformers` 相同：`n_q = floor(bandwidth * 1000 / (log2(codebook_size) * frame_rate))`，
Voila 官方用 `bandwidth=1.1`：1100 / (11 × 25) = 4 層（第一層偏語意）。

PyTorch 只在 `export/` 匯入：抽取 CLI（`data/extract_speech_tokens.py`）與服務端的解碼用這裡，
JAX 訓練路徑只讀抽好的碼（`speakllm_jax.data.speech_tokens`）。
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE
from speakllm_jax.cli import UserFileError

# Voila-Tokenizer 的規格（用來檢查載入的設定）。
VOILA_SAMPLE_RATE = SAMPLE_RATE
VOILA_FRAME_RATE = FRAME_RATE
VOILA_HOP = FRAME_SAMPLES
VOILA_CODEBOOK_SIZE = 2048
VOILA_NUM_CODEBOOKS = 4
VOILA_BANDWIDTH = 1.1
# 短於此框數的句子不併批（見 `VoilaTokenizer.encode`）。
MIN_BATCH_FRAMES = 16


def num_codebooks_for_bandwidth(codebook_size: int, frame_rate: int, bandwidth: float) -> int:
    """給定頻寬（kbps）可用的 RVQ 層數，公式與 `transformers` 的 Encodec 量化器相同。

    加上極小的容差，避免 1.1 × 1000 / 275 這類浮點誤差讓 4 變成 3。
    """
    bits = math.log2(int(codebook_size))
    return int(max(1, math.floor(bandwidth * 1000.0 / (bits * frame_rate) + 1e-6)))


class VoilaTokenizer:
    """以 `transformers.EncodecModel` 抽取與解碼 Voila 語音碼（PyTorch）。

    `checkpoint` 為本機模型資料夾（`config.json` + 權重）；`bandwidth=None` 時選
    `target_bandwidths` 中恰好給出 `num_codebooks` 層的最小頻寬。
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str = "cpu",
        bandwidth: float | None = None,
        num_codebooks: int = VOILA_NUM_CODEBOOKS,
        dtype: str = "float32",
    ) -> None:
        # 延後匯入：torch 很重，只在抽取語音碼時需要
        import torch
        from transformers import EncodecModel

        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise UserFileError(f"{path}：找不到 config.json（需要本機的 Voila-Tokenizer 資料夾）")
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = EncodecModel.from_pretrained(str(path), local_files_only=True).to(
            self.device, dtype=self.dtype
        )
        self.model.eval()
        cfg = self.model.config
        self.config = cfg
        self.checkpoint = str(path)
        self.sample_rate = int(cfg.sampling_rate)
        self.hop = int(np.prod(cfg.upsampling_ratios))
        if self.sample_rate % self.hop:
            raise ValueError(
                f"{path}/config.json：sampling_rate {self.sample_rate} 不是 hop {self.hop} 的整數倍"
            )
        self.frame_rate = self.sample_rate // self.hop
        self.codebook_size = int(cfg.codebook_size)
        if cfg.audio_channels != 1:
            raise ValueError(
                f"{path}/config.json：audio_channels={cfg.audio_channels}，只支援單聲道"
            )
        options = {
            float(bw): num_codebooks_for_bandwidth(self.codebook_size, self.frame_rate, bw)
            for bw in cfg.target_bandwidths
        }
        if bandwidth is None:
            match = sorted(bw for bw, n in options.items() if n == num_codebooks)
            if not match:
                raise ValueError(
                    f"{path}/config.json：target_bandwidths {list(options)} 對應層數 "
                    f"{list(options.values())}，沒有一個是 {num_codebooks} 層"
                )
            bandwidth = match[0]
        if float(bandwidth) not in options:
            raise ValueError(
                f"bandwidth={bandwidth} 不在 {path}/config.json 的 target_bandwidths {list(options)} 中"
            )
        self.bandwidth = float(bandwidth)
        self.num_codebooks = options[self.bandwidth]
        model_nq = self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)
        if model_nq != self.num_codebooks:
            raise RuntimeError(
                f"層數計算與 transformers 不一致：{self.num_codebooks} vs {model_nq}"
            )
        # 補零不影響結果的條件：因果卷積、不做音量正規化、不切塊；否則逐句編碼。
        self.batch_exact = (
            bool(cfg.use_causal_conv) and not cfg.normalize and cfg.chunk_length_s is None
        )

    def meta(self) -> dict[str, Any]:
        """輸出檔的中繼資料（續跑時用來確認設定一致）。"""
        return {
            "tokenizer": "voila",
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "hop_length": self.hop,
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "bandwidth": self.bandwidth,
            "use_causal_conv": bool(self.config.use_causal_conv),
        }

    def frames_for_samples(self, n: int) -> int:
        """`n` 個樣本得到的框數：`ceil(n / hop)`。"""
        return math.ceil(int(n) / self.hop)

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """一批 16 kHz 單聲道波形 → 每句 `[num_codebooks, ceil(n / hop)]` 的 int16 碼。

        每句先補零到整數個框（`ceil(n / hop) * hop` 個樣本），再補零到批次最長並傳入
        `padding_mask`，最後把碼截到各句自己的框數。補到整框後各層卷積都不需要
        `transformers` 在右端以反射方式補的額外長度，因果模型（`use_causal_conv=True`）
        的結果因此與逐句編碼相同（float32 下僅可能在距離幾乎相等的碼之間差一個浮點誤差）。
        非因果、音量正規化或切塊的設定，以及短於 `MIN_BATCH_FRAMES` 框的句子，會逐句編碼。
        """
        torch = self.torch
        if not waves:
            return []
        lengths = [int(np.asarray(w).shape[-1]) for w in waves]
        if min(lengths) <= 0:
            raise ValueError("波形長度必須為正")
        if len(waves) > 1 and (not self.batch_exact or min(lengths) < MIN_BATCH_FRAMES * self.hop):
            # 極短句逐句編碼：卷積在左端以反射補邊，序列短於核寬時會讀到右側補零區。
            short = [
                i
                for i, n in enumerate(lengths)
                if not self.batch_exact or n < MIN_BATCH_FRAMES * self.hop
            ]
            rest = [i for i in range(len(waves)) if i not in set(short)]
            out: dict[int, np.ndarray] = {i: self.encode([waves[i]])[0] for i in short}
            if rest:
                out.update(zip(rest, self.encode([waves[i] for i in rest]), strict=True))
            return [out[i] for i in range(len(waves))]
        frames = [self.frames_for_samples(n) for n in lengths]
        t = max(frames) * self.hop
        x = np.zeros((len(waves), 1, t), np.float32)
        mask = np.zeros((len(waves), 1, t), bool)
        for i, w in enumerate(waves):
            x[i, 0, : lengths[i]] = np.asarray(w, np.float32).reshape(-1)
            mask[i, 0, : frames[i] * self.hop] = True
        with torch.no_grad():
            out = self.model.encode(
                torch.from_numpy(x).to(self.device, dtype=self.dtype),
                torch.from_numpy(mask).to(self.device),
                bandwidth=self.bandwidth,
                return_dict=True,
            )
        codes = out.audio_codes  # [chunks=1, B, n_q, frames]
        if codes.shape[0] != 1:
            raise RuntimeError(
                f"預期單一區塊，得到 {codes.shape[0]} 個（config.chunk_length_s 應為 None）"
            )
        codes = codes[0].cpu().numpy()
        return [codes[i, :, :f].astype(np.int16) for i, f in enumerate(frames)]

    def stream_decoder(self) -> Any:
        """這個模型的有狀態串流解碼器（`voila_stream.VoilaStreamDecoder`，第一次呼叫時建立）。"""
        if getattr(self, "_stream", None) is None:
            # 延後匯入：串流解碼器在模組頂端匯入 torch，只有服務端解碼時需要
            from export.tokenizers.voila_stream import VoilaStreamDecoder

            self._stream = VoilaStreamDecoder(self.model)
        return self._stream

    def decode_codes(self, codes: np.ndarray, num_samples: int | None = None) -> np.ndarray:
        """碼 `[num_codebooks, frames]`（或 `[B, num_codebooks, frames]`）→ 16 kHz 波形 float32。

        輸出長度為 `frames * hop`；給 `num_samples` 時截到該長度。
        """
        torch = self.torch
        c = np.asarray(codes)
        single = c.ndim == 2
        if single:
            c = c[None]
        if c.ndim != 3 or c.shape[1] != self.num_codebooks:
            raise ValueError(f"碼的形狀應為 [{self.num_codebooks}, frames]，收到 {np.shape(codes)}")
        if c.min() < 0 or c.max() >= self.codebook_size:
            raise ValueError(f"碼必須在 [0, {self.codebook_size})，收到範圍 [{c.min()}, {c.max()}]")
        with torch.no_grad():
            out = self.model.decode(
                torch.from_numpy(c.astype(np.int64))[None].to(self.device), [None], return_dict=True
            )
        audio = out.audio_values[:, 0].cpu().numpy().astype(np.float32)
        if num_samples is not None:
            audio = audio[:, : int(num_samples)]
        return audio[0] if single else audio


def make_demo_voila_tokenizer(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """寫出示範用的小型隨機 Voila-Tokenizer（與官方相同的 `EncodecModel` 資料夾格式）。

    16 kHz、上取樣比 8·5·4·4 = 640（25 Hz）、4 碼本 × 2048（頻寬 1.1 kbps）。碼本以編碼器
    對一段掃頻訊號的輸出殘差初始化（如 Encodec 的 k-means 初始化），讓不同語音得到不同的碼。
    只供示範與測試管線；真實訓練請用 maitrix-org/Voila-Tokenizer。
    """
    # 延後匯入：torch 很重，只在抽取語音碼時需要
    import torch
    from transformers import EncodecConfig, EncodecModel

    out = Path(output_dir)
    if (out / "config.json").is_file():
        return out
    cfg = EncodecConfig(
        sampling_rate=16000,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048,
        target_bandwidths=[1.1, 2.2],
        hidden_size=16,
        codebook_dim=16,
        num_filters=4,
        num_lstm_layers=1,
        num_residual_layers=1,
        use_causal_conv=True,
        normalize=False,
    )
    torch.manual_seed(seed)
    model = EncodecModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.arange(16000 * 3) / 16000.0
    x = 0.3 * torch.sin(2 * math.pi * 180 * t * (1 + t)) * torch.rand(t.shape, generator=g)
    with torch.no_grad():
        residual = model.encoder(x[None, None]).transpose(1, 2).reshape(-1, cfg.codebook_dim)
        for layer in model.quantizer.layers:
            pick = torch.randint(0, residual.shape[0], (cfg.codebook_size,), generator=g)
            noise = torch.randn(cfg.codebook_size, cfg.codebook_dim, generator=g)
            layer.codebook.embed.copy_(residual[pick] + 0.05 * residual.std() * noise)
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            residual = residual - layer.codebook.embed[layer.codebook.quantize(residual)]
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.replace(out)
    return out
