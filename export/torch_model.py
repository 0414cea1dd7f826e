"""語音大模型的 PyTorch 孿生：由 `export.to_torch` 匯出的資料夾重建，數值與 JAX 版一致。

組成（資料夾佈局見 `export.to_torch`）：

- 聽：`transformers` 的 `WhisperEncoder`（`whisper_encoder/`）。transformers 的前向強制輸入恰為
  3000 個梅爾框、且忽略注意力遮罩，所以這裡用已載入模組的子模組（`conv1`、`conv2`、
  `embed_positions`、`layers`、`layer_norm`）自己跑前向，加上與 JAX 相同的鍵遮罩與區塊因果遮罩，
  允許少於 3000 框的輸入（串流需要）。
- 想：`transformers.Qwen2ForCausalLM`（`llm/`，LoRA 已合併）。位置編號與 JAX 相同由注意力遮罩累加
  （填充處為 1），並傳入自建的 4D 加性遮罩（因果且只看有效鍵），因此填充夾在序列中間時也與
  JAX 相同。
- 說：`speech_head="voila"` 時深度 Transformer 本身是 `Qwen2ForCausalLM`（`depth/`）；
  `speech_head="cosyvoice2"` 時是 CosyVoice2 的 talker（`talker/`，官方 `llm.pt` 的鍵佈局加上
  融合模組，重建為 `export.cosyvoice2.talker.CosyVoice2TalkerTorch`），逐幀以自己的 KV 快取
  產生一個語音碼。連接器、思考者的語音碼嵌入、聲調嵌入與各個頭是本檔的小模組
  （`heads.safetensors`，設定在 `heads_config.json`）。

方法與 JAX 的 `SpeakLLM` 同名同義：`encode_audio`、`asr_logits`、`frame_inputs`、`duplex_forward`、
`heads_forward`；串流則有 `frame_step`（一幀，使用 transformers 的 KV 快取，或常駐批次快取
`SlotCache` 的一列）與 `stream`（整段，對應 `speakllm_jax.models.streaming.run_streaming`，教師強制
或自由執行）。服務端每個會話一個 `Streamer`，多個會話以 `encode_batch`／`step_batch` 一批前進：
LLM（與 talker）的快取是模型上常駐的批次快取，每個會話占一列，每步就地寫入、不複製也不拆開。
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from export.text_argmax import ScreenedArgmax, greedy
from speakllm_jax.audio.features import IncrementalLogMel
from speakllm_jax.cli import UserFileError
from speakllm_jax.labels import NUM_TONES, NUM_TURN_ACTIONS
from speakllm_jax.turn_policy import TurnDecider, TurnRule, is_speaking

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"
TALKER_DIR = "talker"
TALKER_WEIGHTS = "llm.safetensors"
TALKER_CONFIG = "talker_config.json"
SPEECH_HEADS = ("none", "voila", "cosyvoice2")
# `HeadsConfig` 中與 `SpeakLLMConfig` 不同名的欄位 → 取自哪個子設定的哪個屬性。
NESTED_SOURCES: dict[str, tuple[str, str]] = {
    "whisper_d_model": ("whisper", "d_model"),
    "llm_hidden": ("qwen", "hidden_size"),
    "num_codebooks": ("speech", "num_codebooks"),
    "codebook_size": ("speech", "codebook_size"),
    "depth_hidden": ("speech", "depth_hidden"),
}


@dataclass(frozen=True)
class HeadsConfig:
    """重建小模組所需的 `SpeakLLMConfig` 欄位（`heads_config.json`）。

    與 `SpeakLLMConfig` 同名的欄位直接取同名值；其餘由 `NESTED_SOURCES` 指出取自哪個子設定，
    只有 `pad_id` 由匯出時的分詞器給。`export.to_torch.heads_config_from` 依此逐欄取值，
    `tests/test_config_source.py` 檢查 `SpeakLLMConfig` 的每個純量欄位都在這裡、預設值相同。
    """

    whisper_d_model: int
    llm_hidden: int
    connector_stack: int = 2
    connector_hidden: int = 0
    speech_head: str = "none"
    num_codebooks: int = 4
    codebook_size: int = 2048
    depth_hidden: int = 1024
    max_chars_per_token: int = 4
    num_emotions: int = 0
    pad_id: int = 0
    # 長對話方案（與 JAX `SpeakLLMConfig` 同名欄位相同，見 docs/inference_system.md）。
    stream_chunk_frames: int = 0
    encoder_left_chunks: int = 0
    llm_sink_frames: int = 0
    llm_window_frames: int = 0
    # 輪替決策規則（`speakllm_jax.turn_policy.TurnRule` 的欄位；舊匯出沒有時用其缺省值）。
    turn_rule: dict[str, Any] = field(default_factory=lambda: TurnRule().to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rule(self) -> TurnRule:
        """`turn_rule` 解析成 `TurnRule`（JAX 串流推論與伺服器用同一個規則）。"""
        return TurnRule.from_dict(self.turn_rule, f"{HEADS_CONFIG} 的 turn_rule")

    @classmethod
    def from_model_config(
        cls, cfg: Any, pad_id: int, turn_rule: dict[str, Any] | None = None
    ) -> HeadsConfig:
        """由 JAX 的 `SpeakLLMConfig`（只讀屬性，不需匯入 JAX）逐欄取值；輪替規則來自訓練設定。"""
        kw: dict[str, Any] = {"pad_id": int(pad_id)}
        if turn_rule is not None:
            kw["turn_rule"] = dict(turn_rule)
        for f in fields(cls):
            if f.name in ("pad_id", "turn_rule"):
                continue
            value = cfg
            for attr in NESTED_SOURCES.get(f.name, (f.name,)):
                value = getattr(value, attr)
            kw[f.name] = type(f.default)(value) if f.default is not MISSING else int(value)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = HEADS_CONFIG) -> HeadsConfig:
        """由 JSON 內容建立；缺少必要欄位時指名欄位與檔案。"""
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("whisper_d_model", "llm_hidden") if k not in d]
        if missing:
            raise ValueError(f"{source} 缺少欄位 {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("speech_head", "none") not in SPEECH_HEADS:
            raise ValueError(
                f"{source} 的 speech_head={kw['speech_head']!r}；只支援 {'、'.join(SPEECH_HEADS)}"
            )
        return cls(**kw)

    @property
    def has_speech(self) -> bool:
        return self.speech_head in ("voila", "cosyvoice2")


def _t(
    x: Any, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """numpy／JAX／torch 陣列 → torch 張量（可指定型別與裝置）。"""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    return x.to(device=device, dtype=dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """布林允許遮罩 → 加性遮罩（允許 0，禁止為該型別最小值）。"""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)


def positions_from_mask(mask: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """與 JAX `positions_from_mask` 相同：遮罩累加減一，填充處設為 1。"""
    m = mask.to(torch.long)
    pos = torch.as_tensor(start, dtype=torch.long, device=mask.device)
    if pos.ndim == 1:
        pos = pos[:, None]
    pos = pos + torch.cumsum(m, dim=-1) - 1
    return torch.where(m > 0, pos, torch.ones_like(pos))


def encoder_positions(start: int, length: int, period: int, device: Any = None) -> torch.Tensor:
    """與 JAX `whisper.encoder_positions` 相同：框號對 `period`（`max_source_positions`）取模。"""
    return (torch.arange(length, device=device) + int(start)) % int(period)


def trim_window(cache: Any, sinks: int, window: int) -> Any:
    """LLM 快取的長對話方案：保留最前面 `sinks` 個詞與最近的 `window - 1` 個詞（下一幀再加上
    自己共 `window` 個），與 JAX 的環狀快取（`Qwen2ForCausalLM.init_cache(window=...)`）相同。
    鍵以寫入時的 RoPE 位置旋轉後存放，位置不重設。就地修改 transformers 的 `DynamicCache`。"""
    keep = int(sinks) + int(window) - 1
    for layer in cache.layers:
        if layer.get_seq_length() > keep:
            tail = window - 1
            layer.keys = torch.cat([layer.keys[:, :, :sinks], layer.keys[:, :, -tail:]], dim=2)
            layer.values = torch.cat(
                [layer.values[:, :, :sinks], layer.values[:, :, -tail:]], dim=2
            )
    return cache


def decoder_layers(
    qwen: nn.Module,
    x: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    kv: Any,
) -> torch.Tensor:
    """transformers `Qwen2Model` 的各層與最終正規化（不經它的 `forward`），KV 由呼叫端管理。

    每層的計算與 `Qwen2DecoderLayer` 相同（同樣的子模組、RoPE 與注意力實作），只是新的鍵值交給
    `kv(層號, 鍵, 值)`，它回傳這一層要看的全部鍵值（例如常駐快取的這幾列）。省掉 `forward` 每次
    呼叫時建遮罩、包裝輸出等固定成本（批次排程每一步要跑 LLM 一次、深度 Transformer 每個碼本一次）。
    """
    # 延後匯入：transformers 很重，只在載入或生成時需要
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        qwen.config._attn_implementation, eager_attention_forward
    )
    cos, sin = position_embeddings
    b, t, _ = x.shape
    for i, layer in enumerate(qwen.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (b, t, -1, a.head_dim)
        q = a.q_proj(h).view(shape).transpose(1, 2)
        k = a.k_proj(h).view(shape).transpose(1, 2)
        v = a.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = kv(i, k, v)
        o, _ = attend(
            a, q, k, v, mask, dropout=0.0, scaling=a.scaling, sliding_window=a.sliding_window
        )
        x = x + a.o_proj(o.reshape(b, t, -1).contiguous())
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return qwen.norm(x)


_SLOT_CACHE_LOCK = threading.Lock()  # 建立模型的常駐快取（每個模型每個部分一次）


class SlotRef:
    """一個串流在常駐批次快取（`SlotCache`）裡的一列；物件被回收時歸還那一列。"""

    def __init__(self, pool: SlotCache, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        weakref.finalize(self, pool.release, slot)

    def get_seq_length(self) -> int:
        """存著的詞數：與 `DynamicCache` 依長對話方案截斷後的長度相同。"""
        return self.pool.stored(self.slot)


class SlotCache:
    """常駐的批次 KV 快取：每層一個 `[列, kv 頭, 容量, 頭維]` 的鍵與值，每個串流占一列（slot）。

    批次排程每一步只把這一批各列的新鍵值就地寫到各自的位置、取出這幾列（一次 `index_select`）算
    注意力，以每列自己的有效長度做鍵遮罩；不再每步把各會話的 `DynamicCache` 補齊疊成一批再拆回。
    長對話方案（注意力槽 `sinks` + 視窗 `w`）在這裡是環狀：容量 `sinks + w`，第 `c` 個詞（`c ≥ sinks`）
    寫在 `sinks + (c − sinks) mod w`，正好蓋掉這一步已看不到的那個詞，所以每一步看的仍是前 `sinks`
    個詞加最近的 `w` 個（含自己），與 `trim_window` 截斷後的 `DynamicCache` 相同（鍵的順序不同，注意力
    與順序無關）。沒有視窗時容量不夠就加倍。列不夠時加倍；串流結束（`SlotRef` 被回收）時歸還。
    重配置與前進以同一把鎖互斥（`per_session` 排程會從多個執行緒呼叫）。
    """

    def __init__(
        self,
        config: Any,
        window: tuple[int, int] | None,
        device: Any,
        dtype: torch.dtype,
        rows: int = 4,
        length: int = 256,
    ) -> None:
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.num_layers = int(config.num_hidden_layers)
        self.device, self.dtype = device, dtype
        self.cap = sum(self.window) if self.window else int(length)
        self.k = [self._zeros(rows, self.cap) for _ in range(self.num_layers)]
        self.v = [self._zeros(rows, self.cap) for _ in range(self.num_layers)]
        self.count = [0] * rows  # 每列寫過的詞數
        self.free = list(range(rows - 1, -1, -1))
        self.returned: deque[int] = deque()  # 回收時歸還、還沒收回 `free` 的列
        self.lock = threading.RLock()

    def _zeros(self, rows: int, length: int) -> torch.Tensor:
        shape = (rows, self.heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.count)

    def acquire(self) -> SlotRef:
        """借一列（沒有空列時列數加倍）。"""
        with self.lock:
            self._reclaim()
            if not self.free:
                old = self.rows
                self.k = [torch.cat([k, self._zeros(old, self.cap)]) for k in self.k]
                self.v = [torch.cat([v, self._zeros(old, self.cap)]) for v in self.v]
                self.count += [0] * old
                self.free = list(range(2 * old - 1, old - 1, -1))
            slot = self.free.pop()
            self.count[slot] = 0
            return SlotRef(self, slot)

    def release(self, slot: int) -> None:
        """歸還一列。由 `weakref.finalize` 在任何執行緒、任何配置點呼叫（也可能在別的鎖裡），
        所以不取鎖、不等待：只放進 `returned`（deque 的 append 是原子的），下一次借列時在鎖內收回。"""
        self.returned.append(slot)

    def _reclaim(self) -> None:
        while self.returned:
            self.free.append(self.returned.popleft())

    def free_slots(self) -> set[int]:
        """目前空著的列（含剛歸還的）。"""
        with self.lock:
            self._reclaim()
            return set(self.free)

    def stored(self, slot: int) -> int:
        c = self.count[slot]
        return c if self.window is None else min(c, self.cap - 1)

    def _grow_length(self, need: int) -> None:
        cap = self.cap
        while cap < need:
            cap *= 2
        pad = cap - self.cap
        self.k = [torch.cat([k, self._zeros(self.rows, pad)], dim=2) for k in self.k]
        self.v = [torch.cat([v, self._zeros(self.rows, pad)], dim=2) for v in self.v]
        self.cap = cap

    def _write_index(self, count: int) -> int:
        if self.window is None or count < self.cap:
            return count
        sinks, w = self.window
        return sinks + (count - sinks) % w

    def step(
        self, qwen: nn.Module, x: torch.Tensor, positions: torch.Tensor, slots: list[int]
    ) -> torch.Tensor:
        """`slots` 這幾列各前進一個詞：`x [N, 1, d]`、RoPE 位置 `positions [N, 1]` → 最終隱狀態。"""
        if len(set(slots)) != len(slots):
            raise ValueError("同一批裡不能有重複的列")
        with self.lock:
            counts = [self.count[s] for s in slots]
            if self.window is None and max(counts) + 1 > self.cap:
                self._grow_length(max(counts) + 1)
            dev = x.device
            rows = torch.tensor(slots, dtype=torch.long, device=dev)
            where = torch.tensor(
                [self._write_index(c) for c in counts], dtype=torch.long, device=dev
            )
            valid = [min(c + 1, self.cap) for c in counts]
            span = max(valid)
            seen = torch.arange(span, device=dev)[None] < torch.tensor(valid, device=dev)[:, None]
            mask = additive_mask(seen[:, None, None], x.dtype)

            def kv(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                self.k[i][rows, :, where] = k[:, :, 0]
                self.v[i][rows, :, where] = v[:, :, 0]
                keys = self.k[i][:, :, :span].index_select(0, rows)
                return keys, self.v[i][:, :, :span].index_select(0, rows)

            hidden = decoder_layers(qwen, x, qwen.rotary_emb(x, positions), mask, kv)
            for s in slots:
                self.count[s] += 1
            return hidden


def _with_left(left: torch.Tensor | list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """左方脈絡的 KV（`[B, h, w, d]`，或每列一個 `[1, h, w, d]` 的串列）接上這一區塊的 `new`
    `[B, h, c, d]`：串列時各列直接複製進結果，省下先疊成一批再接上的那一次複製。"""
    if isinstance(left, torch.Tensor):
        return torch.cat([left, new], dim=2)
    b, h, c, d = new.shape
    w = left[0].shape[2]
    out = new.new_empty((b, h, w + c, d))
    torch.cat(left, dim=0, out=out[:, :, :w])
    out[:, :, w:] = new
    return out


class TorchConnector(nn.Module):
    """串接 `stack` 幀 → LayerNorm → Linear → 精確 GELU → Linear。"""

    def __init__(self, in_dim: int, out_dim: int, stack: int = 2, hidden: int = 0) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"connector_stack 必須 ≥ 1，收到 {stack}")
        self.stack = stack
        hidden = hidden or out_dim
        self.norm = nn.LayerNorm(in_dim * stack, eps=1e-5)
        self.fc1 = nn.Linear(in_dim * stack, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, d = frames.shape
        t_out = t // self.stack
        x = frames[:, : t_out * self.stack].reshape(b, t_out, self.stack * d)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))

    def mask(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """輸入幀遮罩 → 輸出幀遮罩：一組全部有效才算有效。"""
        b, t = frame_mask.shape
        t_out = t // self.stack
        m = frame_mask[:, : t_out * self.stack].reshape(b, t_out, self.stack)
        return torch.all(m.bool(), dim=-1)


class SpeechHeads(nn.Module):
    """連接器與語音相關的小模組；`state_dict` 即 `heads.safetensors` 的內容。"""

    def __init__(self, cfg: HeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.llm_hidden
        self.connector = TorchConnector(
            cfg.whisper_d_model, d, cfg.connector_stack, cfg.connector_hidden
        )
        if cfg.has_speech:
            q, c = cfg.num_codebooks, cfg.codebook_size
            self.audio_embed = nn.Parameter(torch.zeros(q, c, d))
            if cfg.speech_head == "voila":
                self.depth_in_proj = nn.Linear(d, cfg.depth_hidden, bias=False)
                self.codebook_pos = nn.Parameter(torch.zeros(q, cfg.depth_hidden))
            self.turn_head = nn.Linear(d, NUM_TURN_ACTIONS)
            self.tone_embed = nn.Embedding(NUM_TONES, d)
            self.tone_head = nn.Linear(d, cfg.max_chars_per_token * NUM_TONES)
            self.emotion_head = nn.Linear(d, cfg.num_emotions) if cfg.num_emotions else None

    def audio_embedding(self, codes: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """`codes [..., Q]` → 各碼本嵌入的平均（無效幀為 0）。"""
        q = self.cfg.num_codebooks
        emb = torch.stack([self.audio_embed[k][codes[..., k]] for k in range(q)], dim=-2)
        out = emb.float().mean(dim=-2)
        if valid is not None:
            out = out * valid[..., None].to(out.dtype)
        return out


@dataclass
class DuplexCache:
    """`speech_head="cosyvoice2"` 的串流快取：思考者（LLM）與 talker 各自的 transformers KV 快取。"""

    llm: Any
    talker: Any

    def get_seq_length(self) -> int:
        return int(self.llm.get_seq_length())


class TorchSpeakLLM(nn.Module):
    """Whisper 編碼器 + 連接器 + Qwen2 + 語音頭（Voila 深度 Transformer 或 CosyVoice2 talker）。"""

    def __init__(
        self,
        cfg: HeadsConfig,
        encoder: nn.Module,
        llm: nn.Module,
        heads: SpeechHeads,
        depth: nn.Module | None = None,
        talker: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if cfg.speech_head == "voila" and depth is None:
            raise ValueError("speech_head='voila' 需要深度 Transformer（depth/ 資料夾）")
        if cfg.speech_head == "cosyvoice2" and talker is None:
            raise ValueError("speech_head='cosyvoice2' 需要 talker（talker/ 資料夾）")
        self.cfg = cfg
        self.encoder = encoder
        self.llm = llm
        self.heads = heads
        self.depth = depth
        self.talker = talker

    # ---------------------------------------------------------------- 基本件

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        # 每一步要問很多次：記下來，`to()`／`half()` 等（都經 `_apply`）時清掉。
        got = self.__dict__.get("_placed")
        if got is None:
            w = self.llm.get_input_embeddings().weight
            got = self.__dict__["_placed"] = (w.device, w.dtype)
        return got

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TorchSpeakLLM:
        self.__dict__.pop("_placed", None)
        self.__dict__.pop("_slots", None)
        self.__dict__.pop("_text_argmax", None)
        return super()._apply(fn, *args, **kwargs)

    @property
    def text_argmax(self) -> ScreenedArgmax:
        """文字頭的貪婪 argmax（不產生 fp32 logits；服務路徑用，見 `export.text_argmax`）。"""
        got = self.__dict__.get("_text_argmax")
        if got is None:
            got = self.__dict__["_text_argmax"] = ScreenedArgmax(self.llm.lm_head)
        return got

    @property
    def dtype(self) -> torch.dtype:
        return self._placement()[1]

    @property
    def device(self) -> torch.device:
        return self._placement()[0]

    def _in(self, x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _t(x, dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def llm_hidden(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """無快取的 LLM 前向，回傳最終正規化後的隱狀態（位置與遮罩同 JAX）；
        `window=(sinks, w)` 時第 i 個位置只看 `j < sinks` 或 `i - j < w`（同 JAX）。"""
        b, t, _ = embeds.shape
        mask = (
            torch.ones((b, t), dtype=torch.bool, device=embeds.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        pos = positions_from_mask(mask)
        causal = torch.tril(torch.ones((t, t), dtype=torch.bool, device=embeds.device))
        if window is not None:
            i = torch.arange(t, device=embeds.device)
            causal = causal & ((i[None, :] < window[0]) | (i[:, None] - i[None, :] < window[1]))
        allowed = causal[None] & mask[:, None, :]
        bias = additive_mask(allowed[:, None], embeds.dtype)
        out = self.llm.model(
            inputs_embeds=embeds, attention_mask=bias, position_ids=pos, use_cache=False
        )
        return out.last_hidden_state

    def encode_features(
        self,
        features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        chunk_frames: int | None = None,
    ) -> torch.Tensor:
        """Whisper 編碼器：`[B, n_mels, F]` → `[B, ceil(F/2), d]`，可帶鍵遮罩與區塊因果遮罩。"""
        enc = self.encoder
        n_mels = enc.config.num_mel_bins
        if features.ndim != 3 or features.shape[1] != n_mels:
            raise ValueError(
                f"features 形狀應為 [B, {n_mels}, frames]，收到 {tuple(features.shape)}"
            )
        x = F.gelu(enc.conv1(features))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        n = x.shape[1]
        period = enc.config.max_source_positions
        left = self.cfg.encoder_left_chunks if chunk_frames is not None else 0
        if left:
            self._check_window(int(chunk_frames))
        if n > period and not left:
            raise ValueError(
                f"{features.shape[2]} 個梅爾框得到 {n} 個輸出框，超過 max_source_positions={period}"
            )
        pos = encoder_positions(0, n, period, x.device)
        x = x + enc.embed_positions.weight[pos].to(x.dtype)
        allowed = None
        if chunk_frames is not None:
            if chunk_frames <= 0:
                raise ValueError(f"chunk_frames 必須為正整數，收到 {chunk_frames}")
            block = torch.arange(n, device=x.device) // int(chunk_frames)
            allowed = block[None, :] <= block[:, None]
            if left:
                allowed = allowed & (block[None, :] >= block[:, None] - left)
            allowed = allowed[None, None]
        if feature_mask is not None:
            if tuple(feature_mask.shape) != (features.shape[0], features.shape[2]):
                raise ValueError(
                    f"feature_mask 形狀應為 {(features.shape[0], features.shape[2])}，"
                    f"收到 {tuple(feature_mask.shape)}"
                )
            keys = feature_mask[:, ::2][:, :n].bool()[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        bias = None if allowed is None else additive_mask(allowed, x.dtype)
        if bias is not None:
            bias = bias.expand(x.shape[0], 1, n, n)
        for layer in enc.layers:
            x = layer(x, bias)
        return enc.layer_norm(x)

    # ---------------------------------------------------------------- 串流編碼器

    def _check_window(self, chunk_enc: int) -> None:
        left = self.cfg.encoder_left_chunks
        if chunk_enc <= 0 or left <= 0:
            raise ValueError(
                f"串流編碼需要 chunk_frames ≥ 1、encoder_left_chunks ≥ 1，收到 {chunk_enc}、{left}"
            )

    def init_audio_stream(self, batch: int, chunk_frames: int) -> dict[str, Any]:
        """同 JAX `SpeakLLM.init_audio_stream`：前一區塊最後兩個梅爾框、每層左方
        `encoder_left_chunks` 個區塊的 KV、已編碼的框數。大小固定。"""
        enc = self.encoder
        c = int(chunk_frames) * self.cfg.connector_stack
        self._check_window(c)
        w = self.cfg.encoder_left_chunks * c
        cfg = enc.config
        h = cfg.encoder_attention_heads
        shape = (batch, h, w, cfg.d_model // h)
        z = {"device": self.device, "dtype": self.dtype}
        return {
            "mel": torch.zeros((batch, cfg.num_mel_bins, 2), **z),
            "k": [torch.zeros(shape, **z) for _ in enc.layers],
            "v": [torch.zeros(shape, **z) for _ in enc.layers],
            "index": 0,
        }

    @torch.inference_mode()
    def stream_audio(
        self, state: dict[str, Any], mel: torch.Tensor, valid: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """同 JAX `SpeakLLM.stream_audio`：`mel [B, n_mels, 2c+1]`（這一區塊的梅爾加一框前瞻，
        超出音訊處補零，`valid` 為真實框數）→ (`[B, c / stack, hidden]`, 新狀態)。

        `state["index"]`（已編碼的框數）可以是每列一個的串列：位置取模的起點、開頭的卷積左邊界
        與左方槽的有效遮罩都逐列計算，所以位置不同的多個串流（`encode_batch`）能合成一批；這時
        每層的左方 KV 也可以是每列一個 `[1, h, w, d]` 的串列，直接複製進這一步的鍵值（不必先疊）。"""
        enc = self.encoder
        b, _, m = mel.shape
        c = (m - 1) // 2
        per_row = isinstance(state["index"], list | tuple)
        index = [int(i) for i in state["index"]] if per_row else int(state["index"])
        valid = m if valid is None else int(valid)
        full = torch.cat([state["mel"], mel.to(self.dtype)], dim=2)
        x = F.gelu(F.conv1d(full, enc.conv1.weight, enc.conv1.bias))
        idx = torch.tensor(index if per_row else [index], device=x.device)[:, None]
        local = torch.arange(2 * c + 1, device=x.device)[None]
        keep = ((local > 0) | (idx > 0)) & (local <= valid)
        x = x * keep[:, None, :].to(x.dtype)
        x = F.gelu(F.conv1d(x, enc.conv2.weight, enc.conv2.bias, stride=2)).permute(0, 2, 1)
        pos = (idx + torch.arange(c, device=x.device)[None]) % enc.config.max_source_positions
        x = x + enc.embed_positions.weight[pos].to(x.dtype)
        first = state["k"][0]
        w = (first if isinstance(first, torch.Tensor) else first[0]).shape[2]
        slot = idx - w + torch.arange(w + c, device=x.device)[None]
        bias = additive_mask((slot >= 0)[:, None, None, :], x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(enc.layers):
            a = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            split = (b, c, a.num_heads, a.head_dim)
            q = (a.q_proj(h) * a.scaling).view(split).transpose(1, 2)
            k = _with_left(state["k"][i], a.k_proj(h).view(split).transpose(1, 2))
            v = _with_left(state["v"][i], a.v_proj(h).view(split).transpose(1, 2))
            # q 已乘上 scaling；融合的注意力比兩次批次矩陣乘法快（區塊很短、左方脈絡很長）
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            o = o.transpose(1, 2).reshape(b, c, -1)
            x = x + a.out_proj(o)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
            new_k.append(k[:, :, c:])
            new_v.append(v[:, :, c:])
        new_index = [i + c for i in index] if per_row else index + c
        new = {"mel": full[:, :, -3:-1], "k": new_k, "v": new_v, "index": new_index}
        return self.heads.connector(enc.layer_norm(x)), new

    # ---------------------------------------------------------------- 與 JAX 同名的方法

    @torch.no_grad()
    def encode_audio(
        self,
        features: Any,
        feature_mask: Any = None,
        chunk_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, n_mels, F]` 梅爾 → (音訊嵌入 `[B, F/2/stack, hidden]`, 有效遮罩)。"""
        feats = self._in(features, self.dtype)
        b, _, f = feats.shape
        fmask = (
            torch.ones((b, f), dtype=torch.bool, device=feats.device)
            if feature_mask is None
            else self._in(feature_mask)
        )
        enc = self.encode_features(feats, fmask.bool(), chunk_frames)
        enc_mask = fmask.bool()[:, ::2][:, : enc.shape[1]]
        conn = self.heads.connector
        return conn(enc), conn.mask(enc_mask)

    @torch.no_grad()
    def asr_logits(
        self,
        features: Any,
        feature_mask: Any,
        prefix_ids: Any,
        suffix_ids: Any,
        text_ids: Any,
        text_mask: Any,
    ) -> torch.Tensor:
        """文字位置的 logits `[B, L, vocab]`（第 i 個位置預測 `text_ids[:, i]`）。"""
        audio, audio_mask = self.encode_audio(features, feature_mask)
        b = audio.shape[0]
        prefix = self._in(prefix_ids, torch.long)
        suffix = self._in(suffix_ids, torch.long)
        text = self._in(text_ids, torch.long)
        pre = self.embed(prefix[None].expand(b, -1))
        suf = self.embed(suffix[None].expand(b, -1))
        embeds = torch.cat([pre, audio.to(pre.dtype), suf, self.embed(text)], dim=1)
        mask = torch.cat(
            [
                torch.ones((b, prefix.shape[0]), dtype=torch.bool, device=self.device),
                audio_mask.bool(),
                torch.ones((b, suffix.shape[0]), dtype=torch.bool, device=self.device),
                self._in(text_mask).bool(),
            ],
            dim=1,
        )
        hidden = self.llm_hidden(embeds, mask)
        n = text.shape[1]
        return self.llm.lm_head(hidden[:, -n - 1 : -1]).float()

    def _require_speech(self) -> None:
        if not self.cfg.has_speech:
            raise ValueError("此模型沒有語音頭（speech_head='none'），不能做全雙工前向")

    @property
    def llm_window(self) -> tuple[int, int] | None:
        """LLM 的（注意力槽幀數, 視窗幀數）；未設定視窗時為 None（同 JAX）。"""
        if self.cfg.llm_window_frames <= 0:
            return None
        return (self.cfg.llm_sink_frames, self.cfg.llm_window_frames)

    @property
    def is_cosyvoice2(self) -> bool:
        return self.cfg.speech_head == "cosyvoice2"

    def talker_logits(
        self,
        hidden: torch.Tensor,
        text_out: torch.Tensor | None,
        codes_in: torch.Tensor | None,
        codes_in_valid: torch.Tensor | None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """cosyvoice2：整段幀模式 talker → `[B, N, 1, 6564]`（同 JAX `SpeakLLM.speech_logits`）。"""
        if text_out is None:
            raise ValueError("speech_head='cosyvoice2' 需要 text_out（思考者每幀輸出的文字符號）")
        if codes_in is None or codes_in_valid is None:
            raise ValueError("speech_head='cosyvoice2' 需要上一幀語音碼 codes_in／codes_in_valid")
        logits = self.talker.forward_frames(
            hidden, text_out, codes_in[..., 0], codes_in_valid, frame_mask, self.llm_window
        )
        return logits[:, :, None]

    def frame_inputs(
        self,
        user: torch.Tensor,
        text_in: torch.Tensor,
        tones_in: torch.Tensor,
        codes_in: torch.Tensor,
        codes_in_valid: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """每幀 LLM 輸入：使用者串流 + 文字嵌入 + 聲調嵌入和 + 語音碼嵌入平均 (+ 條件)。"""
        h = self.heads
        x = user.to(self.dtype) + self.embed(text_in)
        x = x + h.tone_embed(tones_in).sum(dim=-2).to(x.dtype)
        x = x + h.audio_embedding(codes_in, codes_in_valid).to(x.dtype)
        if cond is not None:
            x = x + cond[:, None].to(x.dtype)
        return x

    def depth_inputs(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`hidden [M, d]`、`codes [M, Q]` → 深度序列輸入 `[M, Q, depth_hidden]`。"""
        q = self.cfg.num_codebooks
        first = self.heads.depth_in_proj(hidden)[:, None]
        prev = self.depth.get_input_embeddings()(codes[:, : q - 1])
        seq = torch.cat([first, prev.to(first.dtype)], dim=1)
        return seq + self.heads.codebook_pos.to(seq.dtype)[None]

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """教師強制：`hidden [B, N, d]`、`codes [B, N, Q]` → `[B, N, Q, codebook_size]`。"""
        b, n, d = hidden.shape
        q = self.cfg.num_codebooks
        x = self.depth_inputs(hidden.reshape(b * n, d), codes.reshape(b * n, q))
        out = self.depth.model(inputs_embeds=x, use_cache=False).last_hidden_state
        return self.depth.lm_head(out).float().reshape(b, n, q, -1)

    def depth_generate(self, hidden: torch.Tensor) -> torch.Tensor:
        """逐碼本貪婪產生：`hidden [M, d]` → `codes [M, Q]`（與 JAX 相同的計算順序）。

        深度 Transformer 有自己的 KV 快取：每個碼本只前向一個位置（與整段重算相同）。各層直接以
        `decoder_layers` 跑（不經 `Qwen2Model.forward`），RoPE 的位置 0..Q−1 一次算好；所有列的
        長度相同、因果由快取自然成立，不需要遮罩。"""
        m = hidden.shape[0]
        q = self.cfg.num_codebooks
        depth = self.depth.model
        codes = torch.zeros((m, q), dtype=torch.long, device=hidden.device)
        keys: list[torch.Tensor | None] = [None] * len(depth.layers)
        values: list[torch.Tensor | None] = [None] * len(depth.layers)

        def kv(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if keys[i] is not None:
                k, v = torch.cat([keys[i], k], dim=2), torch.cat([values[i], v], dim=2)
            keys[i], values[i] = k, v
            return k, v

        pos_emb = self.heads.codebook_pos
        x = self.heads.depth_in_proj(hidden)[:, None]
        cos, sin = depth.rotary_emb(x, torch.arange(q, device=hidden.device)[None])
        for k in range(q):
            x = x + pos_emb[k].to(x.dtype)
            out = decoder_layers(depth, x, (cos[:, k : k + 1], sin[:, k : k + 1]), None, kv)
            codes[:, k] = greedy(self.depth.lm_head(out[:, 0]))
            x = self.depth.get_input_embeddings()(codes[:, k : k + 1])
        return codes

    @torch.no_grad()
    def heads_forward(
        self,
        hidden: torch.Tensor,
        codes_target: torch.Tensor,
        user: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        *,
        text_out: torch.Tensor | None = None,
        codes_in: torch.Tensor | None = None,
        codes_in_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """由每幀隱狀態計算各頭輸出（同 JAX `SpeakLLM.heads`；cosyvoice2 另需 `text_out` 與
        上一幀語音碼）。"""
        self._require_speech()
        h = self.heads
        b, n, _ = hidden.shape
        if self.is_cosyvoice2:
            codes = self.talker_logits(hidden, text_out, codes_in, codes_in_valid, frame_mask)
        else:
            codes = self.depth_logits(hidden, codes_target)
        out = {
            "hidden": hidden,
            "text": self.llm.lm_head(hidden).float(),
            "codes": codes,
            "turn": h.turn_head(hidden).float(),
            "tones": h.tone_head(hidden)
            .float()
            .reshape(b, n, self.cfg.max_chars_per_token, NUM_TONES),
        }
        if h.emotion_head is not None and user is not None:
            m = (
                torch.ones((b, n), device=hidden.device)
                if frame_mask is None
                else frame_mask.float()
            )
            pooled = (user.float() * m[..., None]).sum(dim=1) / torch.clamp(
                m.sum(dim=1, keepdim=True), min=1.0
            )
            out["emotion"] = h.emotion_head(pooled.to(hidden.dtype)).float()
        return out

    @torch.no_grad()
    def duplex_forward(
        self,
        features: Any,
        feature_mask: Any,
        text_in: Any,
        tones_in: Any,
        codes_in: Any,
        codes_in_valid: Any,
        codes_target: Any,
        frame_mask: Any,
        cond_ids: Any = None,
        chunk_frames: int | None = None,
        text_out: Any = None,
    ) -> dict[str, torch.Tensor]:
        """全雙工整段前向（教師強制），輸入輸出同 JAX `SpeakLLM.duplex_forward`
        （cosyvoice2 必須給 `text_out [B, N]`）。"""
        self._require_speech()
        if self.is_cosyvoice2 and text_out is None:
            raise ValueError("speech_head='cosyvoice2' 的全雙工前向需要 text_out（每幀文字目標）")
        user, user_mask = self.encode_audio(features, feature_mask, chunk_frames)
        text = self._in(text_in, torch.long)
        n = text.shape[1]
        if user.shape[1] < n:
            raise ValueError(f"使用者串流只有 {user.shape[1]} 幀，少於文字／語音的 {n} 幀")
        user = user[:, :n] * user_mask[:, :n, None].to(user.dtype)
        cond = None if cond_ids is None else self.embed(self._in(cond_ids, torch.long))
        x = self.frame_inputs(
            user,
            text,
            self._in(tones_in, torch.long),
            self._in(codes_in, torch.long),
            self._in(codes_in_valid).bool(),
            cond,
        )
        fmask = self._in(frame_mask).bool()
        hidden = self.llm_hidden(x, fmask, self.llm_window)
        extra = {}
        if self.is_cosyvoice2:
            extra = {
                "text_out": self._in(text_out, torch.long),
                "codes_in": self._in(codes_in, torch.long),
                "codes_in_valid": self._in(codes_in_valid).bool(),
            }
        return self.heads_forward(hidden, self._in(codes_target, torch.long), user, fmask, **extra)

    # ---------------------------------------------------------------- 串流

    def slot_cache(self, part: str = "llm") -> SlotCache:
        """常駐批次快取（第一次呼叫時建立；批次 1 的 `Streamer` 各借一列）：`part="llm"` 為思考者，
        `"talker"` 為 cosyvoice2 的 talker（同一個長對話方案）。"""
        pools = self.__dict__.get("_slots")
        if pools is None or part not in pools:
            # 伺服器在多個執行緒同時建立會話：不加鎖時兩個執行緒可能各建一個，先建的那個被蓋掉，
            # 借到它的列與其他會話不在同一個快取裡，批次前進只能退回逐會話。
            with _SLOT_CACHE_LOCK:
                pools = self.__dict__.setdefault("_slots", {})
                if part not in pools:
                    config = self.llm.config if part == "llm" else self.talker.llm.model.config
                    pools[part] = SlotCache(config, self.llm_window, self.device, self.dtype)
        return pools[part]

    def new_cache(self, resident: bool = False) -> Any:
        """空的串流快取：voila 為 transformers `DynamicCache`；cosyvoice2 為 `DuplexCache`
        （思考者與 talker 各一個 `DynamicCache`）。`resident=True`（批次 1）時思考者的快取改為
        常駐批次快取的一列（`SlotRef`），`step_batch` 不必每步疊合、拆開。"""
        # 延後匯入：transformers 很重，只在載入或生成時需要
        from transformers import DynamicCache

        llm_cache = (
            self.slot_cache().acquire() if resident else DynamicCache(config=self.llm.config)
        )
        if self.is_cosyvoice2:
            talker = self.slot_cache("talker").acquire() if resident else self.talker.new_cache()
            return DuplexCache(llm_cache, talker)
        return llm_cache

    @torch.inference_mode()
    def frame_step(
        self,
        cache: Any,
        position: int,
        user_t: torch.Tensor,
        prev: dict[str, torch.Tensor],
        codes_target: torch.Tensor | None = None,
        cond_ids: torch.Tensor | None = None,
        text_out: torch.Tensor | None = None,
        codes: bool = True,
        logits: bool = True,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """一幀：組輸入 → LLM 一步（KV 快取，位置 `position`）→ 文字、輪替與語音碼。

        `user_t [B, 1, d]`；`prev` 含助理上一幀的 `text [B,1]`、`tones [B,1,K]`、`codes [B,1,Q]`、
        `codes_valid [B,1]`。給 `codes_target [B,1,Q]` 時為教師強制（回傳語音碼 logits），
        否則貪婪產生語音碼：voila 由深度 Transformer 產生 Q 個碼；cosyvoice2 由 talker 以自己的
        KV 快取前進一幀，輸入為 fusion(這一幀隱狀態, 這一幀文字) + 上一幀語音碼嵌入，只在
        一般語音碼（< 6561）中取最大者。cosyvoice2 教師強制時 `text_out [B,1]` 為這一幀的文字
        目標（自由執行用這一幀貪婪選出的文字）。voila 的 `codes=False` 與 `logits=False` 見
        `_frame_outputs`。
        回傳（更新後的快取, 輸出字典）。
        """
        self._require_speech()
        talker_cache = None
        if self.is_cosyvoice2:
            if not isinstance(cache, DuplexCache):
                raise ValueError(
                    "speech_head='cosyvoice2' 的 frame_step 需要 new_cache() 的 DuplexCache"
                )
            if codes_target is not None and text_out is None:
                raise ValueError("speech_head='cosyvoice2' 的教師強制需要 text_out（這一幀文字）")
            cache, talker_cache = cache.llm, cache.talker
        cond = None if cond_ids is None else self.embed(cond_ids)
        x = self.frame_inputs(
            user_t, prev["text"], prev["tones"], prev["codes"], prev["codes_valid"], cond
        )
        b = x.shape[0]
        pos = torch.full((b, 1), int(position), dtype=torch.long, device=x.device)
        if isinstance(cache, SlotRef):
            if b != 1:
                raise ValueError(f"常駐快取的一列只能前進批次 1，收到 {b}")
            hidden = self._llm_rows(x, pos, [cache])
            llm_cache = cache
        else:
            past = cache.get_seq_length()
            bias = torch.zeros((b, 1, 1, past + 1), dtype=x.dtype, device=x.device)
            res = self.llm.model(
                inputs_embeds=x, attention_mask=bias, position_ids=pos, cache=cache, use_cache=True
            )
            hidden = res.last_hidden_state
            llm_cache = self._trim(res.cache)

        def talker_step(h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            nonlocal talker_cache
            if isinstance(talker_cache, SlotRef):
                return self._talker_rows(h, text, prev, pos, [talker_cache])
            logits, talker_cache = self.talker.step(
                talker_cache, h, text, prev["codes"][..., 0], prev["codes_valid"], position
            )
            return logits

        out = self._frame_outputs(hidden, talker_step, codes_target, text_out, codes, logits)
        if self.is_cosyvoice2:
            return DuplexCache(llm_cache, self._trim(talker_cache)), out
        return llm_cache, out

    def _llm_rows(self, x: torch.Tensor, pos: torch.Tensor, rows: list[SlotRef]) -> torch.Tensor:
        """思考者以常駐批次快取的這幾列前進一幀（各列就地寫入、以自己的長度遮罩）。"""
        return rows[0].pool.step(self.llm.model, x, pos, [r.slot for r in rows])

    def _talker_rows(
        self,
        hidden: torch.Tensor,
        text: torch.Tensor,
        prev: dict[str, torch.Tensor],
        pos: torch.Tensor,
        rows: list[SlotRef],
    ) -> torch.Tensor:
        """cosyvoice2 的 talker 以常駐批次快取的這幾列前進一幀，回傳語音碼 logits。"""
        tk = self.talker
        tx = tk.frame_inputs(hidden, text, prev["codes"][..., 0], prev["codes_valid"])
        return tk.decode(rows[0].pool.step(tk.llm.model.model, tx, pos, [r.slot for r in rows]))

    def _frame_outputs(
        self,
        hidden: torch.Tensor,
        talker_step: Any,
        codes_target: torch.Tensor | None = None,
        text_out: torch.Tensor | None = None,
        codes: bool = True,
        logits: bool = True,
    ) -> dict[str, torch.Tensor]:
        """LLM 這一幀的隱狀態 `[B, 1, H]` → 文字與輪替 logits、語音碼（`frame_step` 與
        `step_batch` 共用）；自由執行時另有每列的貪婪文字 `text_ids [B, 1]`。cosyvoice2 以
        `talker_step(隱狀態, 這一幀文字)` 取語音碼 logits，文字在自由執行時為這一幀貪婪選出者；
        voila 由深度 Transformer 產生（或教師強制的 logits）。voila 自由執行且 `codes=False` 時不跑
        深度 Transformer，改回傳 `hidden`，之後只替要說話的列以 `frame_codes` 產生（不說話的幀的
        語音碼在下一幀的輸入裡被 `codes_valid` 遮成 0，不必算）。自由執行且 `logits=False` 時不回傳
        文字 logits，貪婪文字由 `text_argmax`（`ScreenedArgmax`：bf16 篩選、候選精確重算）取得。"""
        out = {"turn": self.heads.turn_head(hidden).float()}
        if codes_target is None and not logits:
            out["text_ids"] = self.text_argmax(hidden)
        else:
            out["text"] = self.llm.lm_head(hidden).float()
            if codes_target is None:
                out["text_ids"] = greedy(out["text"])  # 自由執行：每列的貪婪文字一次取
        if self.is_cosyvoice2:
            if codes_target is None:
                text_out = out["text_ids"]
            logits = talker_step(hidden, text_out.long())
            if codes_target is not None:
                out["codes"] = logits[:, :, None]
                out["code_ids"] = codes_target
            else:
                out["code_ids"] = self.talker.greedy_codes(logits)[..., None]
        elif codes_target is not None:
            out["codes"] = self.depth_logits(hidden, codes_target)
            out["code_ids"] = codes_target
        elif codes:
            out["code_ids"] = self.frame_codes(hidden)
        else:
            out["hidden"] = hidden
        return out

    @torch.inference_mode()
    def frame_codes(self, hidden: torch.Tensor) -> torch.Tensor:
        """voila：這一幀的隱狀態 `[B, 1, H]` → 深度 Transformer 貪婪產生的語音碼 `[B, 1, Q]`。"""
        b = hidden.shape[0]
        return self.depth_generate(hidden.reshape(b, -1)).reshape(b, 1, -1)

    def _trim(self, cache: Any) -> Any:
        window = self.llm_window
        if window is None or isinstance(cache, SlotRef):  # 常駐快取本身是環狀，不必截斷
            return cache
        return trim_window(cache, *window)

    @torch.no_grad()
    def stream(
        self,
        features: Any,
        num_frames: int,
        chunk_frames: int,
        teacher: dict[str, Any] | None = None,
        cond_ids: Any = None,
        pad_id: int | None = None,
    ) -> dict[str, np.ndarray | None]:
        """逐幀執行整段對話（同 JAX `run_streaming`；cosyvoice2 教師強制另需 `teacher["text_out"]`）。

        回傳 numpy：`text_logits [B,N,V]`、`turn_logits [B,N,5]`、`code_logits`（教師強制時
        `[B,N,Q,C]`，否則 None）、`text [B,N]`、`turn [B,N]`、`codes [B,N,Q]`。
        """
        self._require_speech()
        feats = self._in(features, self.dtype)
        dev = feats.device
        b = feats.shape[0]
        n = int(num_frames)
        pad = self.cfg.pad_id if pad_id is None else int(pad_id)
        k = self.cfg.max_chars_per_token
        q = self.cfg.num_codebooks
        prev = {
            "text": torch.full((b, 1), pad, dtype=torch.long, device=dev),
            "tones": torch.zeros((b, 1, k), dtype=torch.long, device=dev),
            "codes": torch.zeros((b, 1, q), dtype=torch.long, device=dev),
            "codes_valid": torch.zeros((b, 1), dtype=torch.bool, device=dev),
        }
        cond = None if cond_ids is None else self._in(cond_ids, torch.long)
        tch = None if teacher is None else {key: self._in(v) for key, v in teacher.items()}
        if self.is_cosyvoice2 and tch is not None and "text_out" not in tch:
            raise ValueError("speech_head='cosyvoice2' 的教師強制串流需要 teacher['text_out']")
        cache = self.new_cache()
        text_l, turn_l, code_l, texts, turns, codes = [], [], [], [], [], []
        deciders = [TurnDecider(self.cfg.rule) for _ in range(b)]
        # 有界左方脈絡時逐區塊帶 KV 快取編碼（同 JAX `SpeakLLM.stream_audio`）；舊匯出
        # （encoder_left_chunks = 0）逐編碼窗以區塊因果遮罩重編窗內前綴（同 JAX 切窗）。
        streamer = Streamer(self, chunk_frames, batch=b)
        user = torch.cat([streamer.push_mel(feats), streamer.flush()], dim=1)
        for t in range(n):
            user_t = user[:, t : t + 1]
            target = None
            text_out = None
            if tch is not None:
                prev = {
                    "text": tch["text_in"][:, t : t + 1].long(),
                    "tones": tch["tones_in"][:, t : t + 1].long(),
                    "codes": tch["codes_in"][:, t : t + 1].long(),
                    "codes_valid": tch["codes_in_valid"][:, t : t + 1].bool(),
                }
                target = tch["codes_target"][:, t : t + 1].long()
                if self.is_cosyvoice2:
                    text_out = tch["text_out"][:, t : t + 1].long()
            cache, out = self.frame_step(cache, t, user_t, prev, target, cond, text_out)
            tok = greedy(out["text"][:, 0])
            turn_np = out["turn"][:, 0].cpu().numpy()
            act = torch.tensor(
                [d.step(row) for d, row in zip(deciders, turn_np)], dtype=torch.long, device=dev
            )
            text_l.append(out["text"][:, 0].cpu().numpy())
            turn_l.append(turn_np)
            if "codes" in out:
                code_l.append(out["codes"][:, 0].cpu().numpy())
            texts.append(tok.cpu().numpy())
            turns.append(act.cpu().numpy())
            codes.append(out["code_ids"][:, 0].cpu().numpy())
            if tch is None:
                speaking = torch.tensor(
                    [is_speaking(a) for a in act.tolist()], dtype=torch.bool, device=dev
                )
                prev = {
                    "text": tok[:, None],
                    "tones": torch.zeros((b, 1, k), dtype=torch.long, device=dev),
                    "codes": out["code_ids"].long(),
                    "codes_valid": speaking[:, None],
                }
        return {
            "text_logits": np.stack(text_l, 1),
            "turn_logits": np.stack(turn_l, 1),
            "code_logits": np.stack(code_l, 1) if code_l else None,
            "text": np.stack(texts, 1),
            "turn": np.stack(turns, 1),
            "codes": np.stack(codes, 1),
        }


class Streamer:
    """一段（或一批同步前進的）對話的串流狀態：狀態在模型、輪替策略在會話、傳輸在伺服器。

    擁有增量對數梅爾（`IncrementalLogMel`，因果正規化）、編碼器串流狀態（左方
    `encoder_left_chunks` 個區塊的 KV）、LLM 快取（注意力槽加滑動視窗，`llm_window_frames`）
    與幀位置。每個區塊的成本與記憶體固定，不隨對話長度增長。舊匯出（`encoder_left_chunks = 0`）
    退回 JAX 的切窗編碼：30 秒一窗，窗內每區塊以區塊因果遮罩重編前綴，窗滿換新窗。

    - `push_audio(samples)`：餵 16 kHz 波形（批次 1），回傳新完成區塊的使用者串流 `[1, k, d]`。
    - `push_mel(mel)`：直接餵梅爾 `[B, n_mels, f]`（可批次），回傳同上 `[B, k, d]`。
    - `flush()`：串流結束，把剩下不足一個區塊的梅爾補零編碼。
    - `step(user_t, prev, ...)`：一幀 `frame_step`（批次 `[B, 1, d]`），自己管快取與 RoPE 位置。
    - `cache_sizes()`：各狀態目前的大小（測試用來確認有界）。
    """

    def __init__(
        self,
        model: TorchSpeakLLM,
        chunk_frames: int,
        batch: int = 1,
        cond_ids: torch.Tensor | None = None,
    ) -> None:
        if int(chunk_frames) < 1:
            raise ValueError(f"chunk_frames 必須 ≥ 1，收到 {chunk_frames}")
        self.model = model
        self.chunk_frames = int(chunk_frames)
        self.chunk_enc = self.chunk_frames * model.cfg.connector_stack
        self.batch = int(batch)
        n_mels = model.encoder.config.num_mel_bins
        self.logmel = IncrementalLogMel(n_mels)
        # 待編碼的梅爾：`_mel` 是張量，`push_audio` 新算出的框先以 numpy 存在 `_pending`，要編碼時
        # 才一次轉成張量接上（每幀各接一次的 `torch.cat` 在 32 個會話時每 tick 約 1–2 ms）。
        self._mel = torch.zeros((self.batch, n_mels, 0), dtype=model.dtype, device=model.device)
        self._pending: list[np.ndarray] = []
        # 舊匯出（encoder_left_chunks = 0）退回切窗編碼：`mel` 存目前編碼窗（≤ 30 秒）的梅爾，
        # 每區塊以區塊因果遮罩重編窗內前綴，窗滿就換新窗（同 JAX `encode_user_stream`）。
        self.windowed = model.cfg.encoder_left_chunks <= 0
        self.window_chunks = 0
        self.win_chunk = 0  # 目前窗內已編碼的區塊數
        if self.windowed:
            per_window = model.encoder.config.max_source_positions // model.cfg.connector_stack
            self.window_chunks = per_window // self.chunk_frames
            if self.window_chunks < 1:
                raise ValueError(
                    f"chunk_frames={chunk_frames} 大於編碼器一窗可容納的 {per_window} 個 LLM 幀"
                )
            self.encoder = None
        else:
            self.encoder = model.init_audio_stream(self.batch, self.chunk_frames)
        self.cache = model.new_cache(resident=self.batch == 1)
        self.position = 0
        self.cond = cond_ids

    @property
    def mel(self) -> torch.Tensor:
        """待編碼的梅爾 `[B, n_mels, f]`（先把 `push_audio` 暫存的框接上）。"""
        if self._pending:
            parts = self.model._in(np.concatenate(self._pending, axis=2), self.model.dtype)
            self._mel = torch.cat([self._mel, parts], dim=2)
            self._pending = []
        return self._mel

    @mel.setter
    def mel(self, value: torch.Tensor) -> None:
        if self._pending:
            raise RuntimeError("Streamer.mel 還有暫存的梅爾框：先讀 mel 再改寫")
        self._mel = value

    @property
    def mel_frames(self) -> int:
        """待編碼的梅爾框數（不必先把暫存的框接上）。"""
        return int(self._mel.shape[2]) + sum(m.shape[2] for m in self._pending)

    def _encode_windowed(self, final: bool) -> list[torch.Tensor]:
        """切窗編碼：湊滿一個區塊（加一框前瞻；窗的最後一區塊不跨窗前瞻）就重編窗內前綴。"""
        step = 2 * self.chunk_enc
        out = []
        while True:
            j = self.win_chunk
            last = j + 1 == self.window_chunks
            need = (j + 1) * step + (0 if last else 1)
            have = self.mel.shape[2]
            if have < need and not (final and have > j * step):
                break
            prefix = self.mel[:, :, : min(need, have)]
            user, _ = self.model.encode_audio(prefix, None, self.chunk_enc)
            out.append(user[:, j * self.chunk_frames : (j + 1) * self.chunk_frames])
            self.win_chunk += 1
            if last or have < need:
                self.mel = self.mel[:, :, min((j + 1) * step, have) :]
                self.win_chunk = 0
        return out

    def _encode_ready(self, final: bool) -> torch.Tensor:
        size = 2 * self.chunk_enc + 1
        out = self._encode_windowed(final) if self.windowed else []
        while not self.windowed and (
            self.mel.shape[2] >= size or (final and self.mel.shape[2] > 0)
        ):
            win = self.mel[:, :, :size]
            valid = win.shape[2]
            if valid < size:
                win = F.pad(win, (0, size - valid))
            user, self.encoder = self.model.stream_audio(self.encoder, win, valid)
            out.append(user)
            self.mel = self.mel[:, :, 2 * self.chunk_enc :]
            if final and valid <= 2 * self.chunk_enc:
                self.mel = self.mel[:, :, :0]
        d = self.model.cfg.llm_hidden
        if not out:
            return torch.zeros((self.batch, 0, d), dtype=self.model.dtype, device=self.model.device)
        return torch.cat(out, dim=1)

    @torch.inference_mode()
    def push_mel(self, mel: Any) -> torch.Tensor:
        """餵梅爾框 `[B, n_mels, f]` → 新完成區塊的使用者串流 `[B, k·chunk_frames, d]`。"""
        m = self.model._in(mel, self.model.dtype)
        self.mel = torch.cat([self.mel, m], dim=2)
        return self._encode_ready(final=False)

    def push_audio(self, samples: np.ndarray, encode: bool = True) -> torch.Tensor:
        """餵 16 kHz float32 波形（批次 1）→ 新完成區塊的使用者串流 `[1, k, d]`。

        `encode=False` 只累積梅爾、回傳空的串流；之後由 `encode_batch` 與其他串流一批編碼。"""
        if self.batch != 1:
            raise ValueError("push_audio 只用於批次 1；批次請以 push_mel 餵各自的梅爾")
        mel = self.logmel.push(samples)[None]
        if encode:
            return self.push_mel(mel)
        if mel.shape[2]:
            self._pending.append(mel)
        d = self.model.cfg.llm_hidden
        return torch.zeros((1, 0, d), dtype=self.model.dtype, device=self.model.device)

    @property
    def chunk_ready(self) -> bool:
        """有界左方脈絡的編碼器已湊滿一個區塊（加一框前瞻）可以編碼。"""
        return not self.windowed and self.mel_frames >= 2 * self.chunk_enc + 1

    @torch.inference_mode()
    def flush(self, audio: bool = False) -> torch.Tensor:
        """串流結束：（`audio=True` 時先結算增量梅爾）把剩下的梅爾補零編碼。"""
        if audio:
            self.mel = torch.cat([self.mel, self.model._in(self.logmel.finish()[None])], dim=2)
        return self._encode_ready(final=True)

    def step(
        self,
        user_t: torch.Tensor,
        prev: dict[str, torch.Tensor],
        codes_target: torch.Tensor | None = None,
        text_out: torch.Tensor | None = None,
        codes: bool = True,
        logits: bool = True,
    ) -> dict[str, torch.Tensor]:
        """一幀（同 `TorchSpeakLLM.frame_step`）；位置自動遞增，LLM 快取依長對話方案截斷。"""
        self.cache, out = self.model.frame_step(
            self.cache,
            self.position,
            user_t,
            prev,
            codes_target,
            self.cond,
            text_out,
            codes,
            logits,
        )
        self.position += 1
        return out

    def cache_sizes(self) -> dict[str, int]:
        """目前的狀態大小：LLM 快取長度、talker 快取長度（cosyvoice2）、編碼器 KV 框數、待編碼梅爾框數、增量梅爾的樣本數。"""
        talker = self.cache.talker.get_seq_length() if isinstance(self.cache, DuplexCache) else 0
        return {
            "llm": int(self.cache.get_seq_length()),
            "talker": int(talker),
            "encoder": 0 if self.encoder is None else int(self.encoder["k"][0].shape[2]),
            "mel": self.mel_frames,
            "samples": self.logmel.buffered_samples,
        }


@torch.inference_mode()
def encode_batch(streamers: list[Streamer]) -> list[torch.Tensor]:
    """多個各自前進的 `Streamer`（批次 1、已編碼的框數各不相同）把已湊滿的區塊一批編碼。

    各列的編碼器狀態（卷積左邊界的兩個梅爾框、每層左方 KV：各列直接複製進這一步的鍵值，只複製
    一次）合成一批，以每列自己的框號（`stream_audio` 的每列 `index`）算位置與遮罩，之後各列取回
    自己的新狀態（這一批張量的檢視，不複製）；結果與逐一
    `push_audio` 相同。回傳每個 `Streamer` 新完成區塊的使用者串流 `[1, k, d]`（沒有則 k = 0）。
    舊匯出（切窗編碼）逐一編碼。
    """
    model = streamers[0].model
    d = model.cfg.llm_hidden
    out = [[] for _ in streamers]
    while True:
        rows = [i for i, st in enumerate(streamers) if st.chunk_ready]
        if not rows:
            break
        group = [streamers[i] for i in rows]
        size = 2 * group[0].chunk_enc + 1
        if any(st.chunk_enc != group[0].chunk_enc for st in group):
            raise ValueError("encode_batch 的 Streamer 必須有相同的 chunk_frames")
        state = {
            "mel": torch.cat([st.encoder["mel"] for st in group]),
            "k": [list(ks) for ks in zip(*(st.encoder["k"] for st in group), strict=True)],
            "v": [list(vs) for vs in zip(*(st.encoder["v"] for st in group), strict=True)],
            "index": [int(st.encoder["index"]) for st in group],
        }
        mel = torch.cat([st.mel[:, :, :size] for st in group])
        user, new = model.stream_audio(state, mel)
        for r, (i, st) in enumerate(zip(rows, group, strict=True)):
            st.encoder = {
                "mel": new["mel"][r : r + 1],
                "k": [k[r : r + 1] for k in new["k"]],
                "v": [v[r : r + 1] for v in new["v"]],
                "index": new["index"][r],
            }
            st.mel = st.mel[:, :, 2 * st.chunk_enc :]
            out[i].append(user[r : r + 1])
    for st, got in zip(streamers, out, strict=True):
        if st.windowed:
            got.append(st._encode_ready(final=False))
    empty = torch.zeros((1, 0, d), dtype=model.dtype, device=model.device)
    return [torch.cat(got, dim=1) if got else empty for got in out]


@torch.inference_mode()
def step_batch(
    streamers: list[Streamer],
    user_t: torch.Tensor,
    prev: dict[str, torch.Tensor],
    codes: bool = True,
    logits: bool = True,
) -> dict[str, torch.Tensor]:
    """多個各自前進的 `Streamer`（批次 1、位置與快取長度各不相同，例如不同時間開始的會話）
    一次前進一幀，結果與逐一 `Streamer.step` 相同。

    `user_t [N, 1, d]` 與 `prev`（各鍵 `[N, 1, …]`）的第 n 列屬於 `streamers[n]`。批次 1 的 `Streamer`
    的 LLM（與 cosyvoice2 的 talker）快取是常駐批次快取（`SlotCache`）的一列：各列的新鍵值就地寫入
    自己的位置、以每列的有效長度遮罩，RoPE 位置每列各自，不複製、不拆開。voila 的深度 Transformer
    一次產生 N 列的語音碼（`codes=False` 時不產生；`logits=False` 時只回傳貪婪文字，見
    `_frame_outputs`）；cosyvoice2 的 talker 同樣一次前進 N 列。
    """
    model = streamers[0].model
    if any(st.model is not model or st.batch != 1 for st in streamers):
        raise ValueError("step_batch 的 Streamer 必須共用同一個模型且批次為 1")
    n = len(streamers)
    if user_t.shape[0] != n:
        raise ValueError(f"user_t 有 {user_t.shape[0]} 列，Streamer 有 {n} 個")
    cosy = model.is_cosyvoice2
    rows = [st.cache.llm if cosy else st.cache for st in streamers]
    t_rows = [st.cache.talker for st in streamers] if cosy else []
    if not _same_pool(rows) or (cosy and not _same_pool(t_rows)):
        raise ValueError(
            "step_batch 的 Streamer 必須都是同一個常駐批次快取的列（模型 to() 之後請重建 Streamer）"
        )
    dev, dt = model.device, model.dtype
    cond = None
    if any(st.cond is not None for st in streamers):
        zero = torch.zeros((1, model.cfg.llm_hidden), dtype=dt, device=dev)
        cond = torch.cat(
            [zero if st.cond is None else model.embed(st.cond).to(dt) for st in streamers]
        )
    x = model.frame_inputs(
        user_t, prev["text"], prev["tones"], prev["codes"], prev["codes_valid"], cond
    )
    pos = torch.tensor([[st.position] for st in streamers], dtype=torch.long, device=dev)
    hidden = model._llm_rows(x, pos, rows)
    out = model._frame_outputs(
        hidden,
        lambda h, text: model._talker_rows(h, text, prev, pos, t_rows),
        codes=codes,
        logits=logits,
    )
    for st in streamers:
        st.position += 1
    return out


def _same_pool(caches: list[Any]) -> bool:
    """各列都是同一個常駐批次快取的列（`SlotRef`）。"""
    first = caches[0] if caches else None
    return isinstance(first, SlotRef) and all(
        isinstance(c, SlotRef) and c.pool is first.pool for c in caches
    )


def load_heads_config(path: str | Path) -> HeadsConfig:
    """讀 `heads_config.json`。"""
    p = Path(path)
    if not p.exists():
        raise UserFileError(f"缺少 {p}（需要 python -m export.to_torch 的輸出資料夾）")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} 不是有效的 JSON：{e}") from e
    return HeadsConfig.from_dict(d, str(p))


def load_talker(
    directory: str | Path,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """讀 `talker/`（`llm.safetensors` + `talker_config.json`）→ `CosyVoice2TalkerTorch`（評估模式）。

    權重檔的鍵即官方 `llm.pt` 的佈局（另有 `fusion.*`），以 strict 載入：缺少或多出的鍵都指名報錯。
    """
    # 延後匯入：transformers 很重，只在載入或生成時需要
    import transformers

    from export.cosyvoice2.talker import CosyVoice2TalkerTorch

    root = Path(directory)
    cfg_path, weights = root / TALKER_CONFIG, root / TALKER_WEIGHTS
    for p in (cfg_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"talker 資料夾 {root} 缺少 {p.name}")
    try:
        tc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} 不是有效的 JSON：{e}") from e
    missing_fields = [
        k for k in ("qwen", "speech_token_size", "thinker_hidden", "fusion") if k not in tc
    ]
    if missing_fields:
        raise ValueError(f"{cfg_path} 缺少欄位 {missing_fields}")
    qcfg = transformers.Qwen2Config(**tc["qwen"])
    qcfg._attn_implementation = attn_implementation
    talker = CosyVoice2TalkerTorch(
        qcfg,
        speech_token_size=int(tc["speech_token_size"]),
        thinker_hidden=int(tc["thinker_hidden"]),
        fusion=str(tc["fusion"]),
        fusion_hidden=int(tc.get("fusion_hidden", 0)),
    )
    state = load_file(str(weights))
    missing, unexpected = talker.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} 與 {TALKER_CONFIG} 不符：缺少 {sorted(missing)}，多出 {sorted(unexpected)}"
        )
    return talker.to(dtype).eval()


def load_exported(
    directory: str | Path,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TorchSpeakLLM:
    """由 `export.to_torch` 寫出的資料夾建立 `TorchSpeakLLM`（評估模式，放到 `device`）。

    `attn_implementation` 傳給 transformers（`eager` 為一致性檢查用，服務端可用 `sdpa`）。
    """
    # 延後匯入：transformers 很重，只在載入或生成時需要
    from transformers import Qwen2ForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    root = Path(directory)
    for name in ("llm", "whisper_encoder", HEADS_FILE, HEADS_CONFIG):
        if not (root / name).exists():
            raise UserFileError(
                f"匯出資料夾 {root} 缺少 {name}（需要 python -m export.to_torch 的輸出資料夾）"
            )
    cfg = load_heads_config(root / HEADS_CONFIG)
    kw = dict(attn_implementation=attn_implementation, dtype=dtype)
    encoder = WhisperEncoder.from_pretrained(root / "whisper_encoder", **kw)
    llm = Qwen2ForCausalLM.from_pretrained(root / "llm", **kw)
    depth = None
    if cfg.speech_head == "voila":
        if not (root / "depth").exists():
            raise FileNotFoundError(f"匯出資料夾 {root} 缺少 depth（speech_head='voila'）")
        depth = Qwen2ForCausalLM.from_pretrained(root / "depth", **kw)
    talker = None
    if cfg.speech_head == "cosyvoice2":
        if not (root / TALKER_DIR).exists():
            raise FileNotFoundError(
                f"匯出資料夾 {root} 缺少 {TALKER_DIR}（speech_head='cosyvoice2'）"
            )
        talker = load_talker(root / TALKER_DIR, attn_implementation, dtype)
    heads = SpeechHeads(cfg)
    state = load_file(str(root / HEADS_FILE))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{root / HEADS_FILE} 與 heads_config.json 不符：缺少 {missing}，多出 {unexpected}"
        )
    model = TorchSpeakLLM(cfg, encoder, llm, heads.to(dtype), depth, talker)
    return model.to(device).eval()
