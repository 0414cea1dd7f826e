"""離線語音符號抽取：Voila-Tokenizer（Hugging Face `EncodecModel`）的 4 層 RVQ 碼，與解碼回波形；
以及 CosyVoice2 的 25 Hz 單碼本 FSQ 碼（S3Tokenizer v2，見 `speakllm_jax.data.cosyvoice2_tokens`）。

Voila-Tokenizer（maitrix-org/Voila-Tokenizer）是 `transformers.EncodecModel`：16 kHz 單聲道、
`upsampling_ratios` 乘積 640 → 每秒 25 框、每層碼本 2048（11 位元）。使用幾層碼本由頻寬決定，
與 `transformers` 相同：`n_q = floor(bandwidth * 1000 / (log2(codebook_size) * frame_rate))`，
Voila 官方用 `bandwidth=1.1`：1100 / (11 × 25) = 4 層（第一層偏語意）。

只在這個模組（以及 `data/extract_speech_tokens.py`）匯入 PyTorch；JAX 訓練路徑只讀抽好的碼。

輸出（以語句 id 為鍵，可續跑）：
    資料夾        每句一個 `<安全檔名>.npy`（int16，[n_q, frames]；CosyVoice2 為 [1, frames]），
                  外加 `meta.json`、`index.jsonl`（id → 檔名、框數）、`skips.jsonl`；
    單一 `.npz`   鍵為語句 id，另有 `__meta__`（JSON 字串）；略過明細寫在 `<檔名>.skips.jsonl`。
所有寫入都先寫暫存檔再 `os.replace`，中途被終止不會留下壞檔；重跑時已完成的 id 直接跳過。
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speakllm_jax.audio.io import AudioError, SkipCounter, load_audio
from speakllm_jax.cli import UserFileError, UserValueError
from speakllm_jax.data.cosyvoice2_tokens import CosyVoice2Tokenizer
from speakllm_jax.data.manifest import read_manifest, resolve_audio

# Voila-Tokenizer 的規格（用來檢查載入的設定）。
VOILA_SAMPLE_RATE = 16000
VOILA_FRAME_RATE = 25
VOILA_HOP = 640
VOILA_CODEBOOK_SIZE = 2048
VOILA_NUM_CODEBOOKS = 4
VOILA_BANDWIDTH = 1.1

SUPPORTED_TOKENIZERS = ("voila", "cosyvoice2")
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


SpeechTokenizer = VoilaTokenizer | CosyVoice2Tokenizer


def load_speech_tokenizer(
    name: str, checkpoint: str | os.PathLike, device: str = "cpu", **kwargs: Any
) -> SpeechTokenizer:
    """依名稱建立語音符號抽取器：`voila`（EncodecModel 資料夾）或 `cosyvoice2`
    （含 s3tokenizer 版面 `speech_tokenizer_v2.pt` 的資料夾或該檔）。"""
    if name == "voila":
        return VoilaTokenizer(checkpoint, device=device, **kwargs)
    if name == "cosyvoice2":
        return CosyVoice2Tokenizer(checkpoint, device=device, **kwargs)
    raise UserValueError(f"未知的語音符號抽取器 {name!r}；可用：{SUPPORTED_TOKENIZERS}")


# ---------------------------------------------------------------- 輸出儲存


def safe_name(utt_id: str) -> str:
    """語句 id → 安全檔名；有改寫時附上 id 雜湊避免碰撞。"""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", utt_id).strip(".") or "_"
    if s != utt_id or len(s) > 150:
        s = f"{s[:150]}-{hashlib.sha1(utt_id.encode('utf-8')).hexdigest()[:10]}"
    return s


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class CodeStore:
    """以語句 id 為鍵的碼儲存（資料夾或單一 .npz），支援續跑。"""

    def __init__(self, output: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = Path(output)
        self.meta = meta
        self.is_npz = self.path.suffix == ".npz"
        self._npz: dict[str, np.ndarray] = {}
        if self.is_npz:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                with np.load(self.path, allow_pickle=False) as z:
                    self._npz = {k: z[k] for k in z.files}
                old = json.loads(str(self._npz.pop("__meta__", "{}")))
                self._check_meta(old)
        else:
            if self.path.exists() and not self.path.is_dir():
                raise UserValueError(
                    f"輸出 {self.path} 已存在且不是資料夾（單一檔案請用 .npz 副檔名）"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            mp = self.path / "meta.json"
            if mp.exists():
                self._check_meta(json.loads(mp.read_text(encoding="utf-8")))
            else:
                data = json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8")
                _atomic_write_bytes(mp, lambda f: f.write(data))

    def _check_meta(self, old: dict[str, Any]) -> None:
        diff = {k: (old.get(k), v) for k, v in self.meta.items() if old and old.get(k) != v}
        if diff:
            raise UserValueError(f"{self.path}：既有輸出的設定與目前不同 {diff}；請換輸出位置")

    def file_for(self, utt_id: str) -> Path:
        return self.path / f"{safe_name(utt_id)}.npy"

    def has(self, utt_id: str) -> bool:
        if self.is_npz:
            return utt_id in self._npz
        return self.file_for(utt_id).is_file()

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """寫入一批；.npz 模式每批整檔原子重寫。"""
        if self.is_npz:
            self._npz.update(items)
            payload = dict(self._npz)
            payload["__meta__"] = np.asarray(json.dumps(self.meta))
            _atomic_write_bytes(self.path, lambda f: np.savez(f, **payload))
            return
        for k, v in items.items():
            _atomic_write_bytes(self.file_for(k), lambda f, v=v: np.save(f, v))

    def get(self, utt_id: str) -> np.ndarray:
        if self.is_npz:
            return self._npz[utt_id]
        return np.load(self.file_for(utt_id))

    def write_index(self, ids: Sequence[str]) -> None:
        """資料夾模式：寫出 id → 檔名與框數的索引（只列已完成者）。"""
        if self.is_npz:
            return
        lines = []
        for i in ids:
            if self.has(i):
                frames = int(np.load(self.file_for(i), mmap_mode="r").shape[-1])
                lines.append(
                    json.dumps(
                        {"id": i, "file": self.file_for(i).name, "frames": frames},
                        ensure_ascii=False,
                    )
                )
        data = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
        _atomic_write_bytes(self.path / "index.jsonl", lambda f: f.write(data))

    def skips_path(self) -> Path:
        if self.is_npz:
            return self.path.with_name(self.path.name + ".skips.jsonl")
        return self.path / "skips.jsonl"


def load_codes(output: str | os.PathLike) -> dict[str, np.ndarray]:
    """讀回抽好的碼：{語句 id: [n_q, frames]}（資料夾依 index.jsonl，或 .npz）。"""
    p = Path(output)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "__meta__"}
    out = {}
    with (p / "index.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = np.load(p / r["file"])
    return out


# ---------------------------------------------------------------- 抽取


@dataclass
class ExtractReport:
    """抽取結果：本次新抽、先前已完成而跳過、以及壞資料略過的計數。"""

    encoded: int = 0
    already_done: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    frames: int = 0

    def table(self) -> str:
        return (
            f"新抽 {self.encoded} 句（{self.frames} 框）；已完成跳過 {self.already_done} 句\n"
            + self.skips.table()
        )


def extract_speech_tokens(
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    checkpoint: str | os.PathLike,
    tokenizer: str = "voila",
    batch_size: int = 8,
    device: str = "cpu",
    max_seconds: float | None = 60.0,
    speech_tokenizer: SpeechTokenizer | None = None,
    channel: int | None = None,
    progress: bool | None = None,
) -> ExtractReport:
    """讀清單、依長度分批抽碼並寫入輸出（見模組說明）；壞音訊略過並依原因計數。

    `channel` 給定時只取該聲道（例如雙聲道對話的助理聲道 1），否則混成單聲道。
    `progress`：stderr 上逐句的 tqdm 進度條（每讀完一句前進一格，每累積 4 批編碼一次）；
    None 為 stderr 是終端機時才顯示，False 關閉。
    """
    if batch_size <= 0:
        raise UserValueError(f"--batch_size 必須為正，收到 {batch_size}")
    tok = speech_tokenizer or load_speech_tokenizer(tokenizer, checkpoint, device=device)
    report = ExtractReport()
    rows = read_manifest(manifest, report.skips)
    mdir = Path(manifest).resolve().parent
    store = CodeStore(output, tok.meta())
    todo: list[tuple[str, np.ndarray]] = []
    ids: list[str] = []
    seen: set[str] = set()
    bar = tqdm(
        rows,
        desc="抽取語音符號",
        unit="句",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    for row in bar:
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            report.skips.add(f"{manifest}:{rid!r}", "bad_row", "缺少 id")
            continue
        if rid in seen:
            report.skips.add(rid, "duplicate_id", "清單中重複的 id")
            continue
        seen.add(rid)
        ids.append(rid)
        if store.has(rid):
            report.already_done += 1
            continue
        try:
            path = resolve_audio(row, mdir)
            dur = row.get("duration")
            wave = load_audio(
                path,
                target_sr=tok.sample_rate,
                offset=float(row.get("offset") or 0.0),
                duration=None if dur is None else float(dur),
                mono=channel is None,
                max_seconds=max_seconds,
            )
            if channel is not None:
                if wave.ndim != 2 or channel >= wave.shape[0]:
                    raise AudioError(
                        "bad_channel", path, f"沒有聲道 {channel}（形狀 {wave.shape}）"
                    )
                wave = np.ascontiguousarray(wave[channel])
        except AudioError as e:
            report.skips.add_error(rid, e)
            continue
        except (ValueError, TypeError) as e:
            report.skips.add(rid, "bad_row", str(e))
            continue
        if wave.shape[-1] < getattr(tok, "min_samples", 1):
            detail = f"{wave.shape[-1]} 個樣本，少於 {tok.min_samples}"
            report.skips.add_error(rid, AudioError("too_short", path, detail))
            continue
        todo.append((rid, wave))
        if len(todo) >= batch_size * 4:
            _flush(tok, store, todo, batch_size, report)
            todo = []
    _flush(tok, store, todo, batch_size, report)
    bar.close()
    store.write_index(ids)
    report.skips.write_jsonl(store.skips_path())
    return report


def _flush(
    tok: SpeechTokenizer,
    store: CodeStore,
    todo: list[tuple[str, np.ndarray]],
    batch_size: int,
    report: ExtractReport,
) -> None:
    """依長度排序後分批編碼（減少補零），每批寫入一次。"""
    order = sorted(range(len(todo)), key=lambda i: todo[i][1].shape[-1])
    for s in range(0, len(order), batch_size):
        chunk = [todo[i] for i in order[s : s + batch_size]]
        codes = tok.encode([w for _, w in chunk])
        store.put_many({rid: c for (rid, _), c in zip(chunk, codes)})
        report.encoded += len(chunk)
        report.frames += int(sum(c.shape[-1] for c in codes))


def make_demo_voila_tokenizer(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """寫出示範用的小型隨機 Voila-Tokenizer（與官方相同的 `EncodecModel` 資料夾格式）。

    16 kHz、上取樣比 8·5·4·4 = 640（25 Hz）、4 碼本 × 2048（頻寬 1.1 kbps）。碼本以編碼器
    對一段掃頻訊號的輸出殘差初始化（如 Encodec 的 k-means 初始化），讓不同語音得到不同的碼。
    只供示範與測試管線；真實訓練請用 maitrix-org/Voila-Tokenizer。
    """
    import math

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
