"""CosyVoice2 語音符號：S3Tokenizer v2（`speech_tokenizer_v2`）的 PyTorch 重寫與批次抽取。

CosyVoice2 的語音符號是 25 Hz 單碼本 FSQ 碼，碼本 3^8 = 6561。流程與 `s3tokenizer` 套件
（xingchensong/S3Tokenizer 的 `model_v2.py`、`utils.py`）相同：

- 16 kHz 波形 → 128 維 Whisper 式對數梅爾（`n_fft=400`、`hop=160`、Slaney 濾波器、
  每句以自己的最大值減 8 截斷、`(x + 4) / 4`），每秒 100 框；直接沿用
  `speakllm_jax.audio.features.log_mel_np(n_mels=128, pad_to_seconds=None)`，
  數值與 `s3tokenizer.log_mel_spectrogram` 一致（濾波器即 librosa 的 Slaney 梅爾）。
- 編碼器：`conv1`、`conv2`（核寬 3、步幅 2、補 1，各接 GELU）→ 25 Hz；卷積前先把補零框歸零。
  接著 `n_layer` 個前置 LayerNorm 區塊：多頭注意力（q、v 有偏置，k 無偏置；旋轉位置編碼，
  維度為頭寬，前後半旋轉；q 與 k 各乘 `head_dim ** -0.25`；補零的鍵加上 -1e10）加上
  FSMN 記憶（對 v 做核寬 31 的逐通道卷積、左右各補 15 個零，再加回 v，補零框歸零），
  之後是 4 倍寬的 GELU 前饋。v2 沒有最後的 LayerNorm。
- FSQ：`project_down` 線性投影到 8 維 → `tanh` → 乘 0.999 → 四捨五入（偶數捨入）→ 加 1，
  得到 8 個三進位數字 d_i ∈ {0, 1, 2}，碼為 Σ d_i · 3^i。
- 長度：每個步幅 2 的卷積把長度 L 變成 `(L - 1) // 2 + 1`，所以 n 個樣本 →
  `n // 160` 個梅爾框 → `ceil(ceil(n // 160 / 2) / 2)` 個碼（1 秒 = 25 個）。
- 長於 30 秒（3000 框）的句子與 `s3tokenizer` 相同：切成 30 秒視窗、相鄰重疊 4 秒
  （步長 2600 框），各窗分別編碼，合併時丟掉每個重疊區兩側各 2 秒（50 個碼）。

權重格式：`s3tokenizer` 由官方 ONNX 轉出的 PyTorch state dict（`onnx2torch(onnx, pt)`，
以 `S3TokenizerV2.init_from_pt` 嚴格載入），鍵名如 `encoder.blocks.0.attn.query.weight`、
`quantizer._codebook.project_down.weight`。這裡以同樣的鍵名嚴格載入，缺鍵、多鍵、
形狀不符都會列出。預設檔名 `speech_tokenizer_v2.pt`；可另附 `s3tokenizer_v2.json`
記錄模型大小（沒有時由權重形狀推得，頭數依官方頭寬 64 推算）。

只在這個模組的函式內匯入 PyTorch；JAX 訓練路徑不會匯入本模組。
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.audio.constants import FRAME_RATE
from speakllm_jax.audio.features import HOP_LENGTH, N_FFT, SAMPLE_RATE, log_mel_np
from speakllm_jax.checkpoints.state_check import shapes_of, state_dict_problems

S3_SAMPLE_RATE = SAMPLE_RATE
S3_MEL_HOP = HOP_LENGTH
S3_TOKEN_RATE = FRAME_RATE
S3_SAMPLES_PER_TOKEN = S3_SAMPLE_RATE // S3_TOKEN_RATE  # 640
S3_FSQ_DIM = 8
S3_FSQ_LEVELS = 3
S3_CODEBOOK_SIZE = S3_FSQ_LEVELS**S3_FSQ_DIM  # 6561
# 與官方相同的 float32 常數（0.999 的 float32 表示）。
S3_FSQ_SCALE = 0.9990000128746033
S3_HEAD_DIM = 64
# 長句切窗（與 s3tokenizer 相同）：30 秒視窗、4 秒重疊、合併時每側丟 2 秒的碼。
S3_WINDOW_FRAMES = 3000
S3_OVERLAP_FRAMES = 400
S3_MERGE_DROP_TOKENS = (4 // 2) * S3_TOKEN_RATE
MASK_BIAS = -1.0e10
# 反射補邊需要多於 n_fft // 2 個樣本。
S3_MIN_SAMPLES = N_FFT // 2 + 1

CHECKPOINT_NAME = "speech_tokenizer_v2.pt"
CONFIG_NAME = "s3tokenizer_v2.json"
ONNX_NAME = "speech_tokenizer_v2.onnx"


class S3CheckpointError(ValueError):
    """S3Tokenizer v2 權重找不到、格式不對或與模型大小不符。"""


@dataclass(frozen=True)
class S3TokenizerV2Config:
    """模型大小；預設為官方 `speech_tokenizer_v2`（128 梅爾、1280 維、20 頭、6 層）。

    `attn_ln_eps`：s3tokenizer 的 git 版本為 1e-6，PyPI 0.3.0 的 v2 改成 1e-5；兩者對碼的
    影響極小，預設跟隨 git 版本與多數移植。
    """

    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    fsmn_kernel: int = 31
    attn_ln_eps: float = 1e-6
    mlp_ln_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    def validate(self) -> S3TokenizerV2Config:
        """檢查各維度；不合法時拋出 `ValueError`。"""
        for f in ("n_mels", "n_state", "n_head", "n_layer", "fsmn_kernel", "max_positions"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"S3TokenizerV2Config.{f} 必須為正，收到 {getattr(self, f)}")
        if self.n_state % self.n_head or self.head_dim % 2:
            raise ValueError(
                f"S3TokenizerV2Config：n_state {self.n_state} 必須能被 n_head {self.n_head} "
                "整除且頭寬為偶數（旋轉位置編碼）"
            )
        if self.max_positions < S3_WINDOW_FRAMES // 4:
            raise ValueError(f"max_positions 至少要 {S3_WINDOW_FRAMES // 4}（30 秒視窗的碼數）")
        return self

    @classmethod
    def tiny(cls, n_layer: int = 2) -> S3TokenizerV2Config:
        """測試與示範用的小模型（128 梅爾、128 維、2 頭、頭寬 64）。"""
        return cls(n_state=128, n_head=2, n_layer=n_layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> S3TokenizerV2Config:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise S3CheckpointError(f"{source}：未知的設定欄位 {unknown}；可用：{sorted(names)}")
        return cls(**d).validate()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """s3tokenizer 版面的參數名稱 → 形狀（與 `S3TokenizerV2.state_dict()` 相同）。"""
        n, k = self.n_state, self.fsmn_kernel
        shapes: dict[str, tuple[int, ...]] = {
            "encoder.conv1.weight": (n, self.n_mels, 3),
            "encoder.conv1.bias": (n,),
            "encoder.conv2.weight": (n, n, 3),
            "encoder.conv2.bias": (n,),
        }
        for i in range(self.n_layer):
            b = f"encoder.blocks.{i}."
            shapes.update(
                {
                    b + "attn.query.weight": (n, n),
                    b + "attn.query.bias": (n,),
                    b + "attn.key.weight": (n, n),
                    b + "attn.value.weight": (n, n),
                    b + "attn.value.bias": (n,),
                    b + "attn.out.weight": (n, n),
                    b + "attn.out.bias": (n,),
                    b + "attn.fsmn_block.weight": (n, 1, k),
                    b + "attn_ln.weight": (n,),
                    b + "attn_ln.bias": (n,),
                    b + "mlp.0.weight": (4 * n, n),
                    b + "mlp.0.bias": (4 * n,),
                    b + "mlp.2.weight": (n, 4 * n),
                    b + "mlp.2.bias": (n,),
                    b + "mlp_ln.weight": (n,),
                    b + "mlp_ln.bias": (n,),
                }
            )
        shapes["quantizer._codebook.project_down.weight"] = (S3_FSQ_DIM, n)
        shapes["quantizer._codebook.project_down.bias"] = (S3_FSQ_DIM,)
        return shapes


# ---------------------------------------------------------------- 長度與 FSQ（numpy，無 PyTorch）


def conv_out_len(n: int) -> int:
    """核寬 3、步幅 2、補 1 的卷積輸出長度：`(n - 1) // 2 + 1`。"""
    return (int(n) - 1) // 2 + 1


def tokens_for_mel_frames(frames: int) -> int:
    """梅爾框數 → 碼數（兩個步幅 2 的卷積）。"""
    return conv_out_len(conv_out_len(frames))


def tokens_for_samples(n: int) -> int:
    """16 kHz 樣本數 → 碼數（含長句切窗後的合併長度）。"""
    return merged_length([tokens_for_mel_frames(f) for f in _window_lengths(int(n) // S3_MEL_HOP)])


def fsq_digits_from_projection(proj: np.ndarray) -> np.ndarray:
    """投影後的 8 維值 → 三進位數字 {0, 1, 2}：`round(tanh(x) * 0.999) + 1`（偶數捨入，同 torch）。"""
    p = np.asarray(proj, np.float32)
    return (np.round(np.tanh(p) * np.float32(S3_FSQ_SCALE)) + 1).astype(np.int64)


def fsq_index(digits: np.ndarray) -> np.ndarray:
    """三進位數字 `[..., 8]` → 碼 Σ d_i · 3^i（第 0 維為最低位）。"""
    d = np.asarray(digits, np.int64)
    if d.shape[-1] != S3_FSQ_DIM or d.min(initial=0) < 0 or d.max(initial=0) >= S3_FSQ_LEVELS:
        raise ValueError(f"FSQ 數字形狀須為 [..., {S3_FSQ_DIM}]、值在 0..2，收到 {d.shape}")
    return d @ (S3_FSQ_LEVELS ** np.arange(S3_FSQ_DIM, dtype=np.int64))


def fsq_digits(index: np.ndarray) -> np.ndarray:
    """碼 → 三進位數字 `[..., 8]`（`fsq_index` 的反函數）。"""
    idx = np.asarray(index, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= S3_CODEBOOK_SIZE):
        raise ValueError(f"碼必須在 [0, {S3_CODEBOOK_SIZE})")
    return (idx[..., None] // (S3_FSQ_LEVELS ** np.arange(S3_FSQ_DIM))) % S3_FSQ_LEVELS


def _window_lengths(frames: int) -> list[int]:
    """長句切窗後各窗的梅爾框數；不超過 3000 框時只有一窗。"""
    if frames <= S3_WINDOW_FRAMES:
        return [frames]
    stride = S3_WINDOW_FRAMES - S3_OVERLAP_FRAMES
    return [min(S3_WINDOW_FRAMES, frames - s) for s in range(0, frames, stride)]


def merged_length(window_tokens: Sequence[int]) -> int:
    """各窗碼數 → 合併後長度（與 `merge_windows` 一致）。"""
    return len(merge_windows([np.zeros(t, np.int64) for t in window_tokens]))


def merge_windows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """合併重疊視窗的碼：第一窗丟尾端、最後一窗丟開頭、中間兩端各丟 50 個（同 s3tokenizer）。"""
    if len(parts) == 1:
        return np.asarray(parts[0])
    drop = S3_MERGE_DROP_TOKENS
    out = []
    for i, p in enumerate(parts):
        lo = 0 if i == 0 else drop
        hi = len(p) - drop if i < len(parts) - 1 else len(p)
        out.append(np.asarray(p)[lo:hi])
    return np.concatenate(out)


def s3_log_mel(wave: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """16 kHz 單句波形 → `[n_mels, n // 160]` 對數梅爾（與 `s3tokenizer.log_mel_spectrogram` 相同）。"""
    w = np.asarray(wave)
    if w.ndim != 1:
        raise ValueError(f"波形必須是一維，收到形狀 {w.shape}")
    if w.shape[0] < S3_MIN_SAMPLES:
        raise ValueError(f"音訊太短：{w.shape[0]} 個樣本，至少需要 {S3_MIN_SAMPLES}")
    return log_mel_np(w.astype(np.float32), n_mels=n_mels, pad_to_seconds=None)


# ---------------------------------------------------------------- 權重讀寫


def _resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """回傳（權重檔, 設定檔或 None）；資料夾中找 `speech_tokenizer_v2.pt`。"""
    p = Path(checkpoint)
    if p.is_file():
        cfg = p.parent / CONFIG_NAME
        return p, cfg if cfg.is_file() else None
    if not p.is_dir():
        raise S3CheckpointError(f"CosyVoice2 語音符號抽取器：找不到 {p}")
    pt = p / CHECKPOINT_NAME
    if not pt.is_file():
        hint = ""
        if (p / ONNX_NAME).is_file():
            hint = (
                f"；資料夾只有官方 ONNX，請先轉成 PyTorch 權重："
                f"`python -c \"import s3tokenizer; s3tokenizer.onnx2torch('{p / ONNX_NAME}', "
                f"'{pt}')\"`（需要 s3tokenizer 與 onnx 套件，可在別台機器轉好再複製）"
            )
        raise S3CheckpointError(
            f"CosyVoice2 語音符號抽取器：{p} 中沒有 {CHECKPOINT_NAME}"
            f"（s3tokenizer 版面的 S3Tokenizer v2 state dict）{hint}"
        )
    cfg = p / CONFIG_NAME
    return pt, cfg if cfg.is_file() else None


def _infer_config(state: dict[str, Any], source: str) -> S3TokenizerV2Config:
    """沒有設定檔時由權重形狀推得模型大小（頭數依官方頭寬 64）。"""
    w = state.get("encoder.conv1.weight")
    if w is None or len(tuple(w.shape)) != 3:
        return S3TokenizerV2Config()  # 由嚴格檢查列出缺少的鍵
    n_state, n_mels = int(w.shape[0]), int(w.shape[1])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    f = state.get("encoder.blocks.0.attn.fsmn_block.weight")
    kernel = int(f.shape[-1]) if f is not None else 31
    if n_state % S3_HEAD_DIM:
        raise S3CheckpointError(
            f"{source}：n_state={n_state} 不是頭寬 {S3_HEAD_DIM} 的倍數，無法推得頭數；"
            f"請在同資料夾放 {CONFIG_NAME}"
        )
    return S3TokenizerV2Config(
        n_mels=n_mels,
        n_state=n_state,
        n_head=n_state // S3_HEAD_DIM,
        n_layer=max(layers) + 1 if layers else 0,
        fsmn_kernel=kernel,
    )


def check_state_dict(state: dict[str, Any], config: S3TokenizerV2Config, source: str) -> None:
    """嚴格比對鍵名與形狀；列出缺少、多出與形狀不符的鍵。"""
    parts = state_dict_problems(shapes_of(state), config.param_shapes(), limit=8)
    if parts:
        raise S3CheckpointError(
            f"{source}：不是 s3tokenizer 版面的 S3Tokenizer v2 權重（{config}）；"
            + "；".join(parts)
        )


# ---------------------------------------------------------------- 模型


class S3TokenizerV2:
    """S3Tokenizer v2 推論（PyTorch 函式式實作，參數鍵名與 s3tokenizer 的 state dict 相同）。

    `params` 為 {鍵: torch.Tensor}；建議以 `from_checkpoint` 或 `random` 建立。
    `dtype="float64"` 時逐句與併批結果逐位元相同，用於測試。
    """

    def __init__(
        self,
        params: dict[str, Any],
        config: S3TokenizerV2Config,
        device: str = "cpu",
        dtype: str = "float32",
        source: str = "<params>",
    ) -> None:
        # 延後匯入：torch 很重，只在抽取語音碼時需要
        import torch

        self.torch = torch
        self.config = config.validate()
        check_state_dict(params, self.config, source)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.params = {
            k: v.detach().to(self.device, dtype=self.dtype) for k, v in sorted(params.items())
        }
        self.source = source
        hd = self.config.head_dim
        inv = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32)[: hd // 2] / hd)
        )
        ang = torch.outer(torch.arange(self.config.max_positions, dtype=torch.float32), inv)
        self._cos = torch.cat([ang.cos(), ang.cos()], dim=-1).to(self.device, self.dtype)
        self._sin = torch.cat([ang.sin(), ang.sin()], dim=-1).to(self.device, self.dtype)

    # ------------------------------------------------------------ 建立與儲存

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "float32"
    ) -> S3TokenizerV2:
        """讀 s3tokenizer 版面的 `.pt`（資料夾或檔案），嚴格載入。"""
        # 延後匯入：torch 很重，只在抽取語音碼時需要
        import torch

        pt, cfg_path = _resolve_checkpoint(checkpoint)
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # 損毀、不是 torch 檔或含任意物件
            raise S3CheckpointError(f"{pt}：無法以 torch.load 讀取（{e}）") from e
        if isinstance(state, dict) and "state_dict" in state and len(state) <= 3:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise S3CheckpointError(f"{pt}：內容不是 {{鍵: tensor}} 的 state dict")
        if cfg_path is not None:
            try:
                raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise S3CheckpointError(f"{cfg_path}：無法讀取設定（{e}）") from e
            config = S3TokenizerV2Config.from_dict(raw, str(cfg_path))
        else:
            config = _infer_config(state, str(pt))
        return cls(state, config, device=device, dtype=dtype, source=str(pt))

    @classmethod
    def random(cls, config: S3TokenizerV2Config, seed: int = 0, **kwargs: Any) -> S3TokenizerV2:
        """隨機初始化（Linear／Conv 以 1/√fan_in 的常態分布，LayerNorm 接近單位）。"""
        # 延後匯入：torch 很重，只在抽取語音碼時需要
        import torch

        g = torch.Generator().manual_seed(int(seed))
        params = {}
        for k, shape in config.validate().param_shapes().items():
            if k.endswith("ln.weight"):
                t = 1.0 + 0.05 * torch.randn(shape, generator=g)
            elif k.endswith(".bias"):
                t = 0.02 * torch.randn(shape, generator=g)
            else:
                fan_in = int(np.prod(shape[1:]))
                t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            params[k] = t
        return cls(params, config, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """s3tokenizer 版面的 state dict（float32、CPU）。"""
        return {k: v.detach().to("cpu", self.torch.float32).clone() for k, v in self.params.items()}

    def save(self, output_dir: str | os.PathLike) -> Path:
        """寫出 `speech_tokenizer_v2.pt` 與 `s3tokenizer_v2.json`（皆先寫暫存檔再改名）。"""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
        self.torch.save(self.state_dict(), tmp)
        os.replace(tmp, out / CHECKPOINT_NAME)
        tmp = out / f".{CONFIG_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=1), encoding="utf-8")
        os.replace(tmp, out / CONFIG_NAME)
        return out

    # ------------------------------------------------------------ 前向

    def _rope(self, x: Any, t: int) -> Any:
        # 前後半旋轉：x * cos + [-x2, x1] * sin；cos/sin 形狀 [1, T, 1, head_dim]。
        cos = self._cos[:t][None, :, None]
        sin = self._sin[:t][None, :, None]
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _block(self, i: int, x: Any, bias: Any, mpad: Any) -> Any:
        f = self.torch.nn.functional
        p = self.params
        c = self.config
        b = f"encoder.blocks.{i}."
        bsz, t, n = x.shape
        h = f.layer_norm(x, (n,), p[b + "attn_ln.weight"], p[b + "attn_ln.bias"], c.attn_ln_eps)
        q = f.linear(h, p[b + "attn.query.weight"], p[b + "attn.query.bias"])
        k = f.linear(h, p[b + "attn.key.weight"])
        v = f.linear(h, p[b + "attn.value.weight"], p[b + "attn.value.bias"])
        q = self._rope(q.view(bsz, t, c.n_head, c.head_dim), t)
        k = self._rope(k.view(bsz, t, c.n_head, c.head_dim), t)
        # FSMN 記憶：對（未旋轉的）v 做逐通道卷積，左右補零，加回 v，補零框歸零。
        vm = v * mpad
        left = (c.fsmn_kernel - 1) // 2
        conv = f.conv1d(
            f.pad(vm.transpose(1, 2), (left, c.fsmn_kernel - 1 - left)),
            p[b + "attn.fsmn_block.weight"],
            groups=n,
        ).transpose(1, 2)
        memory = (conv + vm) * mpad
        scale = c.head_dim**-0.25
        qh = q.permute(0, 2, 1, 3) * scale
        kh = k.permute(0, 2, 3, 1) * scale
        vh = v.view(bsz, t, c.n_head, c.head_dim).permute(0, 2, 1, 3)
        w = self.torch.softmax(qh @ kh + bias, dim=-1)
        att = (w @ vh).permute(0, 2, 1, 3).reshape(bsz, t, n)
        x = x + f.linear(att, p[b + "attn.out.weight"], p[b + "attn.out.bias"]) + memory
        h = f.layer_norm(x, (n,), p[b + "mlp_ln.weight"], p[b + "mlp_ln.bias"], c.mlp_ln_eps)
        h = f.linear(
            f.gelu(f.linear(h, p[b + "mlp.0.weight"], p[b + "mlp.0.bias"])),
            p[b + "mlp.2.weight"],
            p[b + "mlp.2.bias"],
        )
        return x + h

    def encode_hidden(self, mel: Any, mel_len: Any) -> tuple[Any, Any]:
        """`[B, n_mels, T]` 梅爾與各句框數 → 編碼器輸出 `[B, T', n_state]` 與各句碼數。"""
        torch = self.torch
        f = torch.nn.functional
        p = self.params
        x = torch.as_tensor(mel).to(self.device, self.dtype)
        lens = torch.as_tensor(mel_len, dtype=torch.int64).to(self.device)
        if x.ndim != 3 or x.shape[1] != self.config.n_mels:
            raise ValueError(f"梅爾形狀應為 [B, {self.config.n_mels}, T]，收到 {tuple(x.shape)}")
        for name in ("conv1", "conv2"):
            mask = torch.arange(x.shape[-1], device=self.device)[None] < lens[:, None]
            x = x * mask[:, None].to(x.dtype)
            x = f.gelu(
                f.conv1d(
                    x, p[f"encoder.{name}.weight"], p[f"encoder.{name}.bias"], stride=2, padding=1
                )
            )
            lens = (lens - 1) // 2 + 1
        t = x.shape[-1]
        if t > self.config.max_positions:
            raise ValueError(f"序列 {t} 個碼超過位置編碼上限 {self.config.max_positions}")
        valid = torch.arange(t, device=self.device)[None] < lens[:, None]  # [B, T']
        mpad = valid[..., None].to(x.dtype)
        bias = ((1.0 - valid.to(x.dtype)) * MASK_BIAS)[:, None, None, :]
        x = x.transpose(1, 2)
        for i in range(self.config.n_layer):
            x = self._block(i, x, bias, mpad)
        return x, lens

    def quantize_hidden(self, hidden: Any) -> Any:
        """編碼器輸出 → FSQ 碼 `[B, T']`（int64）。"""
        torch = self.torch
        proj = torch.nn.functional.linear(
            hidden,
            self.params["quantizer._codebook.project_down.weight"],
            self.params["quantizer._codebook.project_down.bias"],
        ).float()
        digits = torch.round(torch.tanh(proj) * S3_FSQ_SCALE) + 1
        powers = S3_FSQ_LEVELS ** torch.arange(S3_FSQ_DIM, device=proj.device, dtype=torch.int64)
        return (digits.to(torch.int64) * powers).sum(-1)

    def quantize(self, mel: Any, mel_len: Any) -> tuple[np.ndarray, np.ndarray]:
        """補零批次梅爾 `[B, n_mels, T]`（每句不超過 3000 框）→（碼 `[B, T']`, 各句碼數）。"""
        with self.torch.inference_mode():
            hidden, lens = self.encode_hidden(mel, mel_len)
            codes = self.quantize_hidden(hidden)
        return codes.cpu().numpy(), lens.cpu().numpy()

    def encode_mels(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """各句梅爾 `[n_mels, frames]` → 各句碼（int64，一維）；長於 30 秒者切窗後合併。"""
        segs: list[np.ndarray] = []
        owner: list[int] = []
        for i, m in enumerate(mels):
            m = np.asarray(m, np.float32)
            if m.ndim != 2 or m.shape[0] != self.config.n_mels or m.shape[1] == 0:
                raise ValueError(
                    f"第 {i} 句梅爾形狀應為 [{self.config.n_mels}, frames>0]，收到 {m.shape}"
                )
            stride = S3_WINDOW_FRAMES - S3_OVERLAP_FRAMES
            starts = [0] if m.shape[1] <= S3_WINDOW_FRAMES else range(0, m.shape[1], stride)
            for s in starts:
                segs.append(m[:, s : s + S3_WINDOW_FRAMES])
                owner.append(i)
        if not segs:
            return []
        lens = np.array([s.shape[1] for s in segs], np.int64)
        batch = np.zeros((len(segs), self.config.n_mels, int(lens.max())), np.float32)
        for j, s in enumerate(segs):
            batch[j, :, : s.shape[1]] = s
        codes, code_lens = self.quantize(batch, lens)
        parts: list[list[np.ndarray]] = [[] for _ in mels]
        for j, i in enumerate(owner):
            parts[i].append(codes[j, : int(code_lens[j])])
        return [merge_windows(p) for p in parts]

    def encode(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """一批 16 kHz 單聲道波形 → 各句碼（int64 一維，長度 `tokens_for_samples(n)`）。

        每句各自算梅爾（各自的最大值截斷），補零併批後以遮罩編碼，結果與逐句相同。
        """
        return self.encode_mels([s3_log_mel(w, self.config.n_mels) for w in wavs])


def save_random_s3tokenizer(
    output_dir: str | os.PathLike,
    config: S3TokenizerV2Config | None = None,
    seed: int = 0,
) -> Path:
    """寫出隨機初始化的 S3Tokenizer v2（s3tokenizer 版面 `speech_tokenizer_v2.pt` + 設定檔）。"""
    return S3TokenizerV2.random(config or S3TokenizerV2Config.tiny(), seed=seed).save(output_dir)


def make_demo_s3_tokenizer(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """示範用的小型隨機 S3Tokenizer v2；已存在則直接沿用。

    FSQ 投影以編碼器對一段掃頻訊號的輸出校準（每維減去平均、除以標準差），讓三個量化層級
    都會出現、不同語音得到不同的碼。只供示範與測試管線；真實訓練請用官方
    `speech_tokenizer_v2` 轉出的權重。
    """
    # 延後匯入：torch 很重，只在抽取語音碼時需要
    import torch

    out = Path(output_dir)
    if (out / CHECKPOINT_NAME).is_file():
        return out
    model = S3TokenizerV2.random(S3TokenizerV2Config.tiny(), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.arange(S3_SAMPLE_RATE * 3) / S3_SAMPLE_RATE
    x = 0.3 * torch.sin(2 * math.pi * 180 * t * (1 + t)) * torch.rand(t.shape, generator=g)
    mel = s3_log_mel(x.numpy())
    with torch.inference_mode():
        hidden, _ = model.encode_hidden(mel[None], [mel.shape[1]])
        h = hidden[0]
        w = torch.randn(S3_FSQ_DIM, h.shape[-1], generator=g)
        proj = h @ w.T
        std = proj.std(0).clamp_min(1e-6)
        model.params["quantizer._codebook.project_down.weight"] = w / std[:, None]
        model.params["quantizer._codebook.project_down.bias"] = -proj.mean(0) / std
    tmp = out.with_name(out.name + ".tmp")
    model.save(tmp)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- 抽取器介面


class CosyVoice2Tokenizer:
    """`extract_speech_tokens` 用的 CosyVoice2 語音符號抽取器：每句輸出 `[1, frames]` int16。"""

    name = "cosyvoice2"
    sample_rate = S3_SAMPLE_RATE
    frame_rate = S3_TOKEN_RATE
    codebook_size = S3_CODEBOOK_SIZE
    num_codebooks = 1
    min_samples = S3_MIN_SAMPLES

    def __init__(
        self, checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "float32"
    ) -> None:
        self.model = S3TokenizerV2.from_checkpoint(checkpoint, device=device, dtype=dtype)
        self.checkpoint = str(checkpoint)

    def meta(self) -> dict[str, Any]:
        """輸出檔的中繼資料（續跑時用來確認設定一致）。"""
        c = self.model.config
        return {
            "tokenizer": "cosyvoice2",
            "model": "speech_tokenizer_v2",
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "hop_length": S3_SAMPLES_PER_TOKEN,
            "codebook_size": self.codebook_size,
            "num_codebooks": 1,
            "n_mels": c.n_mels,
            "n_state": c.n_state,
            "n_layer": c.n_layer,
        }

    def frames_for_samples(self, n: int) -> int:
        return tokens_for_samples(n)

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """一批 16 kHz 波形 → 每句 `[1, frames]` int16 碼。"""
        return [c.astype(np.int16)[None] for c in self.model.encode(waves)]
