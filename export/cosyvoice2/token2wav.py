"""CosyVoice2 token2wav：語音 token → flow（50 Hz mel）→ HiFT（24 kHz 波形），一次算完或串流。

一次算完：`Token2Wav(flow, hift)(tokens, prompt_tokens, prompt_mel, embedding)` 回傳 float32
numpy 波形，長度 = `480 × token_mel_ratio × len(tokens)`（每個 token 兩格 mel、每格 480 點）。

串流（對應官方 `CosyVoice2Model.tts(stream=True)` 與 `token2wav`）：

- token 端：每次湊滿 `hop + pre_lookahead_len` 個新 token 才跑一次 flow。flow 每次都從頭
  （提示 + 全部已收 token）重算，但以分塊因果遮罩計算，並只取 `token_offset` 之後的 mel；
  最後 `pre_lookahead_len` 個 token 只當右側脈絡（`finalize=False`）。第一塊的 hop 會補上
  `prompt_token_pad`，讓「提示 + 已輸出 token」剛好落在 `static_chunk_size` 的倍數，
  因此每塊的 mel 與一次算完（同樣使用分塊遮罩）逐格相同。hop 每塊乘上
  `stream_scale_factor`，上限 `token_max_hop_len`。
- 收尾（`finish`）：以 `finalize=True` 重算全部 token。官方此時不用分塊遮罩
  （`final_full_context=True`，預設），最後一段 mel 因而等於一次算完且不用遮罩的結果。
- HiFT 端：每塊保留最後 `mel_cache_len`（8）格 mel、對應的 3840 點激發源與 3840 點波形。
  下一塊把這 8 格 mel 接在前面重算，激發源前 3840 點以快取取代，波形前 3840 點與上一塊
  保留的尾端以 Hamming 窗交叉淡化；非最後一塊都扣住最後 3840 點不輸出。
  因此所有輸出片段接起來的總長度恰為 `480 × mel 格數`，與一次算完相同。
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.cosyvoice2.flow import (
    FlowConfig,
    FlowModel,
    dataclass_from_dict,
    flow_config,
    load_flow,
    save_random_flow,
)
from export.cosyvoice2.hift import (
    HIFT_OFFICIAL,
    HIFT_TINY,
    HiFTGenerator,
    load_hift,
    save_random_hift,
)

__all__ = [
    "SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "TOKEN2WAV_CONFIG",
    "StreamConfig",
    "Token2Wav",
    "Token2WavStream",
    "load_token2wav",
    "save_random_token2wav",
]

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 480
TOKEN2WAV_CONFIG = "token2wav.json"
_CONFIG_KEYS = ("flow", "hift", "stream", "hift_seed")


@dataclass(frozen=True)
class StreamConfig:
    """串流參數；預設值同官方 `CosyVoice2Model`。

    `token_hop_len` 為 None 時取 flow 的 `static_chunk_size`（官方 25），且必須是其倍數；
    `token_max_hop_len` 為 None 時取 4 倍 hop。
    """

    token_hop_len: int | None = None
    token_max_hop_len: int | None = None
    stream_scale_factor: int = 2
    mel_cache_len: int = 8
    final_full_context: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "stream config") -> StreamConfig:
        return dataclass_from_dict(cls, data, where)

    def resolved(self, flow_cfg: FlowConfig) -> tuple[int, int]:
        """回傳 (hop, max_hop)，並檢查與 flow 分塊大小相容。"""
        hop = flow_cfg.static_chunk_size if self.token_hop_len is None else int(self.token_hop_len)
        max_hop = 4 * hop if self.token_max_hop_len is None else int(self.token_max_hop_len)
        chunk = flow_cfg.static_chunk_size
        if hop <= 0 or hop % chunk != 0 or max_hop < hop or max_hop % chunk != 0:
            raise ValueError(
                f"stream: token_hop_len={hop}、token_max_hop_len={max_hop} 必須是 flow "
                f"static_chunk_size={chunk} 的正倍數且 max ≥ hop（否則串流 mel 與一次算完不一致）"
            )
        if self.stream_scale_factor < 1:
            raise ValueError(
                f"stream: stream_scale_factor 至少為 1，收到 {self.stream_scale_factor}"
            )
        if self.mel_cache_len < 1 or self.mel_cache_len > hop * flow_cfg.token_mel_ratio:
            raise ValueError(
                f"stream: mel_cache_len={self.mel_cache_len} 必須在 1 與每塊 mel 格數 "
                f"{hop * flow_cfg.token_mel_ratio} 之間"
            )
        return hop, max_hop


def _fade_in_out(new: torch.Tensor, previous: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """新波形前半窗長與上一塊保留的尾端交叉淡化（Hamming 窗前半淡入、後半淡出）。"""
    n = window.numel() // 2
    out = new.clone()
    out[..., :n] = new[..., :n] * window[:n] + previous[..., -n:] * window[n:]
    return out


class Token2Wav:
    """flow + HiFT 的 token2wav 包裝；一次算完用 `__call__`，串流用 `stream`／`start_stream`。"""

    def __init__(
        self,
        flow: FlowModel,
        hift: HiFTGenerator,
        stream_config: StreamConfig | dict[str, Any] | None = None,
        *,
        hift_seed: int | None = 0,
    ) -> None:
        self.flow = flow.eval()
        self.hift = hift.eval()
        if stream_config is None:
            stream_config = StreamConfig()
        elif isinstance(stream_config, dict):
            stream_config = StreamConfig.from_dict(stream_config)
        self.stream_config = stream_config
        self.token_hop_len, self.token_max_hop_len = stream_config.resolved(flow.config)
        self.hift_seed = hift_seed
        self.sample_rate = SAMPLE_RATE

    @property
    def samples_per_token(self) -> int:
        return SAMPLES_PER_FRAME * self.flow.config.token_mel_ratio

    def new_generator(self) -> torch.Generator | None:
        """HiFT 激發源（正弦初相、噪聲）用的亂數產生器；`hift_seed=None` 時用全域亂數。"""
        if self.hift_seed is None:
            return None
        return torch.Generator().manual_seed(int(self.hift_seed))

    def mel(
        self,
        tokens: Any,
        prompt_tokens: Any = None,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        *,
        streaming: bool = False,
        finalize: bool = True,
    ) -> torch.Tensor:
        """只跑 flow：回傳 `(1, 80, 2·T)` mel。"""
        return self.flow.inference(
            tokens, prompt_tokens, prompt_mel, embedding, finalize=finalize, streaming=streaming
        )

    @torch.inference_mode()
    def vocode(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT：`(1, 80, T)` mel → (`(1, 480·T)` 波形, `(1, 1, 480·T)` 激發源)。"""
        device = next(self.hift.parameters()).device
        mel = mel.to(device=device, dtype=torch.float32)
        if cache_source is not None:
            cache_source = cache_source.to(device)
        return self.hift.inference(mel, cache_source, generator=generator)

    def __call__(
        self,
        tokens: Any,
        prompt_tokens: Any = None,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        *,
        streaming: bool = False,
    ) -> np.ndarray:
        """一次算完：回傳 24 kHz float32 波形 `(480·2·T,)`。"""
        mel = self.mel(tokens, prompt_tokens, prompt_mel, embedding, streaming=streaming)
        wav, _ = self.vocode(mel, None, self.new_generator())
        return wav[0].detach().float().cpu().numpy()

    def start_stream(
        self,
        prompt_tokens: Any = None,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> Token2WavStream:
        """開一條串流；之後以 `push(tokens)` 餵 token、`finish()` 收尾。"""
        return Token2WavStream(self, prompt_tokens, prompt_mel, embedding)

    def stream(
        self,
        token_chunks: Iterable[Any],
        prompt_tokens: Any = None,
        prompt_mel: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> Iterator[np.ndarray]:
        """逐批餵入 token，每產生一段波形就 yield（可能為空陣列的批次會略過）；最後 yield 收尾段。"""
        session = self.start_stream(prompt_tokens, prompt_mel, embedding)
        for chunk in token_chunks:
            out = session.push(chunk)
            if out.size:
                yield out
        yield session.finish()


class Token2WavStream:
    """一條串流的狀態：已收 token、輸出位置、hop 長度與 HiFT 快取（mel / 激發源 / 波形尾端）。"""

    def __init__(
        self,
        owner: Token2Wav,
        prompt_tokens: Any,
        prompt_mel: torch.Tensor | None,
        embedding: torch.Tensor | None,
    ) -> None:
        self.owner = owner
        flow = owner.flow
        self.prompt_tokens = prompt_tokens
        self.prompt_mel = prompt_mel
        self.embedding = embedding
        n_prompt = 0 if prompt_tokens is None else int(np.asarray(prompt_tokens).size)
        chunk = flow.config.static_chunk_size
        self.prompt_token_pad = -n_prompt % chunk
        self.hop = owner.token_hop_len
        self.tokens: list[int] = []
        self.token_offset = 0
        self.finished = False
        self.mels: list[torch.Tensor] = []
        self.emitted_samples = 0
        self._generator = owner.new_generator()
        self._cache: dict[str, torch.Tensor] | None = None
        cache_len = owner.stream_config.mel_cache_len
        self._mel_cache_len = cache_len
        self._source_cache_len = cache_len * SAMPLES_PER_FRAME
        self._window = torch.from_numpy(np.hamming(2 * self._source_cache_len).astype(np.float32))

    def _this_hop(self) -> int:
        return self.hop + self.prompt_token_pad if self.token_offset == 0 else self.hop

    def push(self, tokens: Any) -> np.ndarray:
        """加入新 token；湊滿一個以上的 hop（含預看）時輸出對應波形，否則回傳空陣列。"""
        if self.finished:
            raise RuntimeError("串流已 finish，不能再 push")
        new = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self.tokens.extend(int(t) for t in new)
        lookahead = self.owner.flow.config.pre_lookahead_len
        pieces = []
        while len(self.tokens) - self.token_offset >= self._this_hop() + lookahead:
            hop = self._this_hop()
            upto = self.token_offset + hop + lookahead
            mel = self.owner.mel(
                self.tokens[:upto],
                self.prompt_tokens,
                self.prompt_mel,
                self.embedding,
                streaming=True,
                finalize=False,
            )
            mel = mel[:, :, self.token_offset * self.owner.flow.config.token_mel_ratio :]
            self.mels.append(mel)
            pieces.append(self._vocode(mel, final=False))
            self.token_offset += hop
            self.hop = min(
                self.owner.token_max_hop_len,
                self.hop * self.owner.stream_config.stream_scale_factor,
            )
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """以 `finalize=True` 處理剩餘 token，並輸出全部尚未送出的波形。"""
        if self.finished:
            raise RuntimeError("串流已 finish")
        self.finished = True
        ratio = self.owner.flow.config.token_mel_ratio
        if len(self.tokens) > self.token_offset:
            mel = self.owner.mel(
                self.tokens,
                self.prompt_tokens,
                self.prompt_mel,
                self.embedding,
                streaming=not self.owner.stream_config.final_full_context,
                finalize=True,
            )
            mel = mel[:, :, self.token_offset * ratio :]
        else:
            mel = torch.zeros(1, self.owner.flow.config.output_size, 0)
        self.mels.append(mel)
        if mel.size(2) == 0 and self._cache is None:
            return np.zeros(0, dtype=np.float32)
        return self._vocode(mel, final=True)

    def _vocode(self, mel: torch.Tensor, final: bool) -> np.ndarray:
        cache = self._cache
        if cache is not None:
            mel = torch.cat([cache["mel"], mel.to(cache["mel"].device)], dim=2)
            cache_source = cache["source"]
        else:
            cache_source = None
        speech, source = self.owner.vocode(mel, cache_source, self._generator)
        speech = speech.detach().float().cpu()
        if cache is not None:
            speech = _fade_in_out(speech, cache["speech"], self._window)
        if not final:
            n = self._source_cache_len
            self._cache = {
                "mel": mel[:, :, -self._mel_cache_len :],
                "source": source[:, :, -n:],
                "speech": speech[:, -n:],
            }
            speech = speech[:, :-n]
        out = speech[0].numpy().astype(np.float32, copy=False)
        self.emitted_samples += out.size
        return out


# ---------------------------------------------------------------- 讀寫


def _hift_config(value: Any, where: str) -> dict[str, Any]:
    if value is None or value == "official":
        return dict(HIFT_OFFICIAL)
    if value == "tiny":
        return dict(HIFT_TINY)
    if isinstance(value, dict):
        return dict(value)
    raise ValueError(f"{where}: hift 需為 'official'、'tiny' 或 JSON 物件，收到 {value!r}")


def read_token2wav_config(directory: str | Path) -> dict[str, Any]:
    """讀 `token2wav.json`（不存在時全部採官方預設）並檢查欄位。"""
    path = Path(directory) / TOKEN2WAV_CONFIG
    if not path.exists():
        return {"flow": "official", "hift": "official", "stream": {}, "hift_seed": 0}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: 不是合法的 JSON（{err}）") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: 頂層必須是 JSON 物件")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: 未知欄位 {unknown}；可用欄位為 {list(_CONFIG_KEYS)}")
    return {
        "flow": data.get("flow", "official"),
        "hift": data.get("hift", "official"),
        "stream": data.get("stream", {}),
        "hift_seed": data.get("hift_seed", 0),
    }


def load_token2wav(directory: str | Path, map_location: str | torch.device = "cpu") -> Token2Wav:
    """從資料夾讀 `flow.pt`、`hift.pt` 與（可選的）`token2wav.json`，建立 `Token2Wav`。"""
    directory = Path(directory)
    cfg = read_token2wav_config(directory)
    where = str(directory / TOKEN2WAV_CONFIG)
    try:
        fcfg = flow_config(cfg["flow"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: flow 設定錯誤：{err}") from err
    stream = StreamConfig.from_dict(cfg["stream"], where=f"{where} 的 stream")
    seed = cfg["hift_seed"]
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"{where}: hift_seed 必須是整數或 null，收到 {seed!r}")
    flow = load_flow(directory / "flow.pt", fcfg, map_location=map_location)
    hift = load_hift(directory / "hift.pt", _hift_config(cfg["hift"], where)).to(map_location)
    return Token2Wav(flow, hift, stream, hift_seed=seed)


def save_random_token2wav(
    directory: str | Path,
    flow: FlowConfig | dict[str, Any] | str = "tiny",
    hift: dict[str, Any] | str = "tiny",
    seed: int = 0,
    stream: StreamConfig | dict[str, Any] | None = None,
) -> Path:
    """寫出一組隨機權重的 `flow.pt`、`hift.pt` 與 `token2wav.json`（測試與示範用）。"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fcfg = flow_config(flow)
    hcfg = _hift_config(hift, "save_random_token2wav")
    save_random_flow(directory / "flow.pt", fcfg, seed=seed)
    save_random_hift(directory / "hift.pt", hcfg, seed=seed + 1)
    if isinstance(stream, StreamConfig):
        stream_dict = asdict(stream)
    else:
        stream_dict = dict(stream or {})
    payload = {
        "flow": fcfg.to_dict(),
        "hift": json.loads(json.dumps(hcfg)),
        "stream": stream_dict,
        "hift_seed": 0,
    }
    (directory / TOKEN2WAV_CONFIG).write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return directory
