"""一段全雙工對話的狀態機：40 ms 一幀地吃使用者音訊，逐幀跑 PyTorch 孿生並產生助理的音訊與文字。

每幀的流程：

- 快速路徑（收到就做）：webrtcvad 判定這一幀是否有使用者語音（兩個 20 ms 子幀任一為語音，且幀的
  能量不低於這段語音峰值減 30 dB：webrtcvad 在語音結束後會多報 4–6 幀），更新使用者語音段落。
  助理說話中使用者開口（連續 `onset_frames` 幀語音）就先停住（hold）助理的音訊與文字：模型照常
  產生，訊息存在會話裡不送出。語音持續到 `backchannel_max_seconds` 是打斷（barge-in）：送出
  `YIELDED`、丟掉停住的音訊、結束這一輪（伺服器同時丟掉送出佇列中還沒送出的音訊）；較短的語音
  在兩個靜音幀後判定為附和：送出 `BACKCHANNEL`、依序放出停住的音訊，同一輪從停住處繼續
  （幀號連續、不丟不重複；播放比原定晚了停住的時間）。`policy="model"` 時打斷與附和由輪替頭的
  yield 分辨，長度上限改為 `model_barge_in_seconds`（輪替頭一直沒讓出時的後備）。
- 模型路徑：每一幀的 640 個樣本交給 PyTorch 孿生的 `Streamer`（`export.torch_model`），串流狀態
  都在它裡面：增量對數梅爾（因果正規化）、有界左方脈絡的編碼器快取、LLM（注意力槽加滑動視窗）
  與深度／talker 的快取。每湊滿一個區塊（`chunk_frames` 幀；含梅爾窗與卷積的前瞻，比快速路徑
  晚 1–2 幀）回傳這一區塊的使用者串流，會話逐幀呼叫 `Streamer.step`（自由執行：上一幀的文字、語音碼
  回饋為下一幀的輸入）。每幀的成本與記憶體不隨對話長度增長，對話長度不受限。舊匯出
  （`heads_config.json` 沒有串流欄位，`encoder_left_chunks = 0`）由 `Streamer` 退回切窗編碼。
  會話只管輪替策略，伺服器只管傳輸。
- 說話的幀把語音碼解成音訊送出：`speech_head="voila"` 每幀解成 16 kHz 的 640 個樣本；
  `speech_head="cosyvoice2"` 每幀的一個 CosyVoice2 語音碼推進這一輪的 token2wav 串流
  （`export.cosyvoice2.token2wav.Token2Wav`：分塊流匹配 + HiFT），解出的 24 kHz 波形切成
  每 40 ms（960 樣本）一個封包送出，封包的 `seq` 仍是它在使用者時間軸上的幀號
  （這一輪第一個說話幀起算）。token2wav 每湊滿 `hop + pre_lookahead_len` 個語音碼才解一塊，
  所以 cosyvoice2 的首包比 voila 晚（官方設定 25 + 3 個語音碼 = 1.12 秒音訊時間）。輪次正常結束
  時 `finish()` 把剩下的語音碼解完送出；被打斷時直接丟棄這一輪的串流，不再送任何音訊。

輪替策略：

- `vad`：規則決定何時說話——使用者說完（最後一個語音幀後靜音滿 `end_silence_ms`）的那一幀開始說，
  最多 `max_reply_seconds`；內容（語音碼、文字）仍由模型產生。未訓練的小模型也能得到可重現的輪替，
  測試用這個策略。
- `model`：輪替頭決定：每幀的輪替 logits 經 `speakllm_jax.turn_policy.TurnDecider`（門檻、平滑、
  最短說話幀數；規則是匯出資料夾 `heads_config.json` 的 `turn_rule`，與 JAX 串流推論、PyTorch
  孿生的 `stream` 同一份），動作為 speak／continue／backchannel 時說話；停住、打斷與附和的判定與
  `vad` 相同，輪替頭在使用者說話時輸出 yield 也算打斷。被打斷後到使用者說完之前、以及使用者
  最近兩幀內有語音時不開口。

Voila 的逐幀解碼（`decode_mode`）：Voila-Tokenizer（EncodecModel）的解碼器是因果卷積加 LSTM。
預設 `"stream"` 以有狀態的串流解碼器（`export.tokenizers.voila_stream`）每個說話幀只解這一幀，
每一輪一個解碼狀態（卷積的左方脈絡、轉置卷積的重疊尾端、LSTM 的 (h, c)）：新的一輪從新狀態開始，
停住（附和）期間照常解碼、狀態不斷，放出後的音訊接著原來的波形。一輪送出的音訊與整輪語音碼一次
解碼的波形逐樣本相同，只有開頭不同：整段解碼在序列開頭以反射補邊、讀到之後的幾幀，逐幀送時幀率上
的卷積以零補邊（見該模組說明）。批次排程把所有說話會話的這一幀合成一批解碼。`"window"` 是舊的近似：
每幀把最近 `decode_window_frames` 幀一起解碼、只取最後一幀的 640 個樣本，視窗以外的歷史被截斷，
每幀解碼 8 幀的計算（基準比較用）。
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webrtcvad

from configs.serving import get_config as serving_config
from export.cosyvoice2.token2wav import load_token2wav
from export.serving import duplex_pb2 as pb
from export.tokenizers.voila import VoilaTokenizer
from export.tokenizers.voila_stream import VoilaStreamState
from export.torch_model import (
    Streamer,
    TorchSpeakLLM,
    encode_batch,
    load_exported,
    step_batch,
)
from speakllm_jax.audio.constants import FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE
from speakllm_jax.labels import SPEAKING_ACTIONS, TurnAction
from speakllm_jax.turn_policy import TurnDecider, TurnRule, parse_overrides

COSYVOICE2_RATE = 24000  # CosyVoice2 token2wav（HiFT）的輸出取樣率
YIELD_ACTION = int(TurnAction.YIELD)
POLICIES = ("vad", "model")
DECODE_MODES = ("stream", "window")
# webrtcvad 在語音結束後還會回報 4–6 幀（160–240 ms）的語音（內部的 overhang），連數位靜音也是；
# 只把能量夠的幀算作語音：不低於 `VOICED_FLOOR_RMS`，且不低於這段語音峰值減 `VOICED_TAIL_DB`。
VOICED_FLOOR_RMS = 1e-3
VOICED_TAIL_DB = 30.0
HISTORY_TURNS = 8
BACKCHANNEL_GAP_FRAMES = 2  # 助理說話時，短語音之後靜音幾幀就判定為附和
# 批次失敗退回逐會話時記一行警告（結果仍對，但慢很多，不該悄悄發生）。
_LOG = logging.getLogger("export.serving")
FALLBACKS: dict[str, int] = {}  # 各批次步驟退回逐會話的次數（本程序累計）


def _warn_fallback(step: str, e: BaseException) -> None:
    """記下一次退回：第 1 次與之後每 1000 次各一行警告，不讓每個 tick 都洗版。"""
    n = FALLBACKS[step] = FALLBACKS.get(step, 0) + 1
    if n == 1 or n % 1000 == 0:
        _LOG.warning("%s 批次失敗（第 %d 次），逐會話重跑：%s: %s", step, n, type(e).__name__, e)


class SessionError(Exception):
    """會話層的錯誤，帶 gRPC 狀態碼名稱（例如 "INVALID_ARGUMENT"）。"""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass
class Engine:
    """所有會話共用的模型：PyTorch 孿生、語音解碼器（Voila 或 CosyVoice2 token2wav）、分詞器。"""

    model: TorchSpeakLLM
    voila: Any
    tokenizer: Any
    special_ids: frozenset[int]
    pad_id: int
    token2wav: Any = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def speech_head(self) -> str:
        return self.model.cfg.speech_head

    @property
    def output_rate(self) -> int:
        """送出的助理音訊取樣率：voila 16 kHz，cosyvoice2 24 kHz。"""
        if self.token2wav is not None:
            return int(self.token2wav.sample_rate)
        return SAMPLE_RATE

    @property
    def output_frame_samples(self) -> int:
        """一個 40 ms 音訊封包的樣本數（16 kHz 為 640，24 kHz 為 960）。"""
        return round(self.output_rate * FRAME_SECONDS)


def load_engine(
    model_dir: str | Path,
    voila_dir: str | Path = "",
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    token2wav_dir: str | Path = "",
) -> Engine:
    """載入匯出的模型資料夾（`export.to_torch`）與語音解碼器資料夾。

    `speech_head="voila"` 需要 `voila_dir`（Voila-Tokenizer）；`speech_head="cosyvoice2"` 需要
    `token2wav_dir`（`flow.pt`、`hift.pt` 與選擇性的 `token2wav.json`）。
    """
    # 延後匯入：transformers 很重，只在載入文字分詞器時需要
    from transformers import AutoTokenizer

    if not str(model_dir):
        raise ValueError("設定 model_dir 是空的：需要 `python -m export.to_torch` 匯出的資料夾")
    model = load_exported(
        model_dir,
        attn_implementation=attn_implementation,
        dtype=getattr(torch, dtype),
        device=device,
    )
    head = model.cfg.speech_head
    if head not in ("voila", "cosyvoice2"):
        raise ValueError(f"{model_dir} 的模型沒有語音頭（speech_head='{head}'），不能做語音對話")
    tok_dir = Path(model_dir) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
    special = frozenset(tokenizer.all_special_ids) if tokenizer is not None else frozenset()
    special = special | {model.cfg.pad_id}
    if head == "cosyvoice2":
        return Engine(
            model,
            None,
            tokenizer,
            special,
            model.cfg.pad_id,
            token2wav=_load_token2wav(model, token2wav_dir, device),
        )
    if not str(voila_dir):
        raise ValueError("設定 voila_dir 是空的：需要 Voila-Tokenizer（EncodecModel）資料夾")
    voila = VoilaTokenizer(voila_dir, device=device)
    if voila.sample_rate != SAMPLE_RATE or voila.hop != FRAME_SAMPLES:
        raise ValueError(
            f"{voila_dir}：需要 16 kHz、hop 640 的 Voila-Tokenizer，收到 "
            f"{voila.sample_rate} Hz、hop {voila.hop}"
        )
    if voila.num_codebooks != model.cfg.num_codebooks:
        raise ValueError(
            f"碼本數不符：模型 {model.cfg.num_codebooks}，{voila_dir} 為 {voila.num_codebooks}"
        )
    return Engine(model, voila, tokenizer, special, model.cfg.pad_id)


def _load_token2wav(model: TorchSpeakLLM, token2wav_dir: str | Path, device: str) -> Any:
    """cosyvoice2：讀 token2wav 資料夾並檢查與 talker 的語音詞表、取樣率相容。"""
    if not str(token2wav_dir):
        raise ValueError(
            "設定 token2wav_dir 是空的：speech_head='cosyvoice2' 需要 CosyVoice2 token2wav 資料夾"
            "（flow.pt、hift.pt）"
        )
    d = Path(token2wav_dir)
    for name in ("flow.pt", "hift.pt"):
        if not (d / name).exists():
            raise FileNotFoundError(f"token2wav_dir {d} 缺少 {name}")
    t2w = load_token2wav(d, map_location=device)
    vocab = int(t2w.flow.config.vocab_size)
    need = int(model.talker.speech_token_size)
    if vocab < need:
        raise ValueError(f"{d}：flow 的 vocab_size={vocab} 小於 talker 的語音碼數 {need}")
    if int(t2w.sample_rate) != COSYVOICE2_RATE:
        raise ValueError(f"{d}：token2wav 取樣率 {t2w.sample_rate}，預期 {COSYVOICE2_RATE}")
    return t2w


_SERVING = serving_config()  # 欄位的預設值取自 configs/serving.py（唯一的一份）


@dataclass
class SessionSettings:
    """單一會話用到的設定（由伺服器設定與會話選項合併）；每個欄位都是 `configs/serving.py` 的同名
    欄位，預設值也取自那裡（`tests/test_config_source.py` 檢查名稱與型別）。"""

    policy: str = _SERVING.policy
    chunk_frames: int = _SERVING.chunk_frames
    spread_steps: bool = _SERVING.spread_steps
    decode_mode: str = _SERVING.decode_mode
    decode_window_frames: int = _SERVING.decode_window_frames
    vad_aggressiveness: int = _SERVING.vad_aggressiveness
    onset_frames: int = _SERVING.onset_frames
    end_silence_ms: int = _SERVING.end_silence_ms
    max_reply_seconds: float = _SERVING.max_reply_seconds
    backchannel_max_seconds: float = _SERVING.backchannel_max_seconds
    model_barge_in_seconds: float = _SERVING.model_barge_in_seconds
    reaction_window_frames: int = _SERVING.reaction_window_frames
    turn_rule: str = _SERVING.turn_rule
    condition: str = _SERVING.condition

    @classmethod
    def from_config(cls, cfg: Any) -> SessionSettings:
        names = cls.__dataclass_fields__
        return cls(**{k: cfg[k] for k in names if k in cfg})

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise SessionError("INVALID_ARGUMENT", f"policy={self.policy!r}；可用 {POLICIES}")
        if self.decode_mode not in DECODE_MODES:
            raise SessionError(
                "INVALID_ARGUMENT", f"decode_mode={self.decode_mode!r}；可用 {DECODE_MODES}"
            )
        if self.chunk_frames < 1 or self.decode_window_frames < 1 or self.onset_frames < 1:
            raise SessionError(
                "INVALID_ARGUMENT", "chunk_frames、decode_window_frames、onset_frames 必須 ≥ 1"
            )
        if self.backchannel_max_frames >= self.reaction_window_frames:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"backchannel_max_seconds（{self.backchannel_max_frames} 幀）必須短於 "
                f"reaction_window_frames（{self.reaction_window_frames}）",
            )

    def rule(self, exported: dict[str, Any]) -> TurnRule:
        """匯出的 `turn_rule`（字典）加上設定 `turn_rule` 的覆寫；不合理時拋出 SessionError。"""
        try:
            over = parse_overrides([self.turn_rule], "turn_rule")
            return TurnRule.from_dict({**exported, **over}, "turn_rule")
        except ValueError as err:
            raise SessionError("INVALID_ARGUMENT", str(err)) from None

    @property
    def end_silence_frames(self) -> int:
        return max(1, round(self.end_silence_ms / 1000 / FRAME_SECONDS))

    @property
    def backchannel_max_frames(self) -> int:
        return max(1, round(self.backchannel_max_seconds / FRAME_SECONDS))

    @property
    def barge_in_frames(self) -> int:
        """停住後使用者語音持續幾幀就以長度判定為打斷：`vad` 為 `backchannel_max_seconds`，
        `model` 為 `model_barge_in_seconds`（在那之前由輪替頭的 yield 分辨打斷與附和）。"""
        if self.policy != "model":
            return self.backchannel_max_frames
        return max(self.backchannel_max_frames, round(self.model_barge_in_seconds / FRAME_SECONDS))

    @property
    def max_reply_frames(self) -> int:
        return max(1, round(self.max_reply_seconds / FRAME_SECONDS))


@dataclass
class _Turn:
    index: int
    trigger_frame: int
    trigger_time: float
    first_audio_frame: int = -1
    first_audio_time: float = 0.0
    frames: int = 0
    compute: float = 0.0
    yielded: bool = False
    reaction_frames: int = -1
    hold_frame: int = -1  # 因使用者開口而停住助理音訊的幀（-1：沒有停住）
    done: bool = False  # 已產生完（停住期間到了結尾：等判定後才結束這一輪）
    codes: list[np.ndarray] = field(default_factory=list)
    # voila 串流解碼：這一輪的解碼器狀態（一列的 `VoilaStreamState`，第一個說話幀時建立）。
    voila: Any = None
    # cosyvoice2：這一輪的 token2wav 串流、尚未湊滿一個封包的 24 kHz 樣本、第一個說話幀與已送封包數。
    t2w: Any = None
    audio_buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    audio_start: int = -1
    packets: int = 0


@dataclass
class _StepJob:
    """一個會話一幀的模型輸出在解碼前後之間的東西（批次排程在中間一批解碼）。"""

    f: int
    t0: float
    enc_time: float
    tok: int = 0
    codes: Any = None
    # 還沒產生語音碼的這一幀隱狀態 [1, 1, H]（voila：只替說話的幀以 `fill_codes` 一批產生）
    hidden: torch.Tensor | None = None
    speaking: bool = False
    # 要解碼的 Voila 語音碼 [Q, T]：串流解碼為這一幀（T = 1），視窗解碼為最近的視窗；
    # 不說話或 cosyvoice2 為 None。
    window: np.ndarray | None = None
    turn: _Turn | None = None  # 串流解碼：狀態所屬的輪次
    out: list = field(default_factory=list)


class DuplexSession:
    """一段對話。方法都不是執行緒安全的：伺服器對同一會話依序呼叫。"""

    def __init__(self, engine: Engine, settings: SessionSettings) -> None:
        settings.validate()
        self.engine = engine
        self.s = settings
        m = engine.model
        self.cond = None
        if settings.condition:
            tok = engine.tokenizer
            cid = None if tok is None else tok.convert_tokens_to_ids(settings.condition)
            if cid is None or cid == getattr(tok, "unk_token_id", None):
                raise SessionError(
                    "INVALID_ARGUMENT", f"條件符號 {settings.condition!r} 不在分詞器中"
                )
            self.cond = torch.tensor([int(cid)], dtype=torch.long, device=m.device)
        self.vad = webrtcvad.Vad(int(settings.vad_aggressiveness))
        # 串流狀態（梅爾、編碼器、LLM／深度／talker 快取）都在模型的 Streamer 裡。
        self.streamer = Streamer(m, settings.chunk_frames, cond_ids=self.cond)
        # policy="model" 的輪替決策（與 JAX／孿生的串流推論同一個規則；設定 turn_rule 可覆寫）。
        self.decider = TurnDecider(settings.rule(m.cfg.turn_rule))
        k, q = m.cfg.max_chars_per_token, m.cfg.num_codebooks
        dev = m.device
        self.prev = {
            "text": torch.full((1, 1), engine.pad_id, dtype=torch.long, device=dev),
            "tones": torch.zeros((1, 1, k), dtype=torch.long, device=dev),
            "codes": torch.zeros((1, 1, q), dtype=torch.long, device=dev),
            "codes_valid": torch.zeros((1, 1), dtype=torch.bool, device=dev),
        }
        self.pending = np.zeros(0, np.float32)  # 不足一幀的樣本
        # 已編好、還沒跑模型的幀：（幀號, 使用者串流 [1, 1, d], 分攤的編碼秒數）。
        self.steps: deque[tuple[int, torch.Tensor, float]] = deque()
        # 攤開模型步（`spread_steps`）：每收到一幀跑一步，待跑的步數超過 lag 才補跑；
        # allow 為這一輪收到、還沒用掉的幀數（批次排程在 step_sessions 裡用掉）。
        self.lag = settings.chunk_frames - 1 if settings.spread_steps else 0
        self.allow = 0
        self.frame = 0  # 已收到的完整幀數
        self.model_frame = 0  # 已跑過模型的幀數
        # 還沒跑模型的幀的抵達時間（第 arrival_base 幀起）。
        self.arrival: list[float] = []
        self.arrival_base = 0
        # 使用者語音段落（快速路徑）。
        self.speech_run = 0
        self.silence_run = 0
        self.run_start = 0
        self.last_voiced = -1
        self.seg_peak = 0.0  # 目前這段使用者語音的幀 RMS 峰值
        self.user_onset = -1
        self.user_active = False  # 目前在一段（≥ onset_frames 的）使用者語音中
        # 助理說話時使用者開口：停住助理的音訊與文字（held），判定是附和就放出、是打斷就丟掉。
        self.holding = False
        self.held: list[pb.ServerMessage] = []
        self.user_spoke = False  # 上一次助理說話後使用者說過話（vad 策略的回應條件）
        self.yield_lock = False  # 被打斷後到使用者說完前不說話
        # 助理。
        self.turn: _Turn | None = None
        self.turn_count = 0
        self.plan: dict[int, int] = {}  # 幀 → 該幀說話所屬的輪次（vad 策略）
        self.ended = False
        self.trigger_times: dict[int, float] = {}  # 輪次 → 觸發幀抵達的時間（伺服器補量測用）
        # 最近結束的輪次（含每幀語音碼）；只留最近幾輪，長會話的記憶體有上限。
        self.history: deque[_Turn] = deque(maxlen=HISTORY_TURNS)

    # ---------------------------------------------------------------- 公開介面

    @property
    def seconds(self) -> float:
        return self.frame * FRAME_SECONDS

    def start_messages(self) -> list[pb.ServerMessage]:
        eng = self.engine
        detail = (
            f"session started; speech_head={eng.speech_head}; output_sample_rate={eng.output_rate}"
        )
        return [self._event(pb.Event.SESSION_STARTED, 0, detail)] + [
            self._event(pb.Event.LISTENING, 0)
        ]

    def feed(
        self, samples: np.ndarray, arrival: float | None = None, defer: bool = False
    ) -> list[pb.ServerMessage]:
        """餵 16 kHz float32 音訊（任意長度）；回傳要送給客戶端的訊息（依時間順序）。

        每一幀之後跑該跑的模型步（`spread_steps` 時一步、落後超過 `chunk_frames − 1` 步時補到不超過；
        否則全部）。`defer=True`（批次排程）：只做快速路徑，模型步留給 `step_sessions` 與其他會話
        一批前進；此時待跑的模型步須已不超過上面的落後量。"""
        now = time.perf_counter() if arrival is None else arrival
        self.pending = np.concatenate([self.pending, np.asarray(samples, np.float32)])
        out: list[pb.ServerMessage] = []
        while len(self.pending) >= FRAME_SAMPLES:
            if defer and len(self.steps) > self.lag:
                raise RuntimeError("defer=True 時上一幀的模型步還沒做完（先呼叫 step_sessions）")
            frame, self.pending = self.pending[:FRAME_SAMPLES], self.pending[FRAME_SAMPLES:]
            out += self._on_frame(frame, now, defer)
            self.allow += 1
            if not defer:
                out += self.run_steps(due_only=True)
        return out

    @property
    def pending_steps(self) -> int:
        """已編好、還沒跑模型的幀數。"""
        return len(self.steps)

    def due(self) -> bool:
        """現在該跑下一個模型步：這一輪還有收到的幀沒用掉，或待跑的步數超過落後量。"""
        return bool(self.steps) and (self.allow > 0 or len(self.steps) > self.lag)

    def claim_step(self) -> bool:
        """`due` 時用掉這一輪收到的一幀（單一會話的 `run_steps` 與批次的 `step_sessions` 共用）。"""
        if not self.due():
            return False
        self.allow = max(0, self.allow - 1)
        return True

    def run_steps(self, due_only: bool = False) -> list[pb.ServerMessage]:
        """逐一跑待跑的模型步（單一會話的路徑）：全部，或 `due_only` 時只跑該跑的（見 `due`）。"""
        out: list[pb.ServerMessage] = []
        while self.claim_step() if due_only else self.steps:
            f, user_t, enc_time = self.steps[0]
            t0 = time.perf_counter()
            res = self.streamer.step(user_t, self.prev, codes=False, logits=False)
            job = self.after_step(f, res, t0, enc_time)
            fill_codes([(self, job)])
            out += self.finish_step(job, self.decode([job])[0])
        self.allow = 0  # 收到的幀只在它那一輪用（沒有待跑的步時不累積）
        return out

    def interrupt(self) -> list[pb.ServerMessage]:
        """客戶端明確要求打斷：立刻停止說話。"""
        if self.turn is None:
            return []
        self.yield_lock = True
        return self._end_turn(self.frame, yielded=True, onset=self.frame, detail="interrupt")

    def finish(self) -> list[pb.ServerMessage]:
        """結束會話：把剩下的幀跑完（不足一個區塊也跑）、結算進行中的輪次。"""
        if self.ended:
            return []
        out = self.run_steps()
        t0 = time.perf_counter()
        user = self.streamer.flush(audio=True)
        self._queue_steps(user, time.perf_counter() - t0)
        out += self.run_steps()
        if self.turn is not None:
            out += self._end_turn(self.frame, yielded=False)
        self.ended = True
        out.append(self._event(pb.Event.SESSION_ENDED, self.frame, "session ended"))
        return out

    def cache_sizes(self) -> dict[str, int]:
        """串流狀態目前的大小（`Streamer.cache_sizes`；長對話時有上限）。"""
        return self.streamer.cache_sizes()

    def close_messages(self, reason: str) -> list[pb.ServerMessage]:
        """伺服器主動結束會話（例如關機）時送的最後訊息；不動會話狀態，計算執行緒可能還在跑。"""
        return [self._event(pb.Event.SESSION_ENDED, self.frame, reason)]

    # ---------------------------------------------------------------- 快速路徑

    def _voiced(self, frame: np.ndarray) -> bool:
        """webrtcvad 判為語音（兩個 20 ms 子幀任一）且能量夠（見 `VOICED_TAIL_DB`）。"""
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        half = len(pcm) // 2
        # 兩個子幀都要送進 VAD（它的雜訊估計與 overhang 是逐子幀更新的狀態）。
        first = self.vad.is_speech(pcm[:half], SAMPLE_RATE)
        second = self.vad.is_speech(pcm[half:], SAMPLE_RATE)
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        floor = max(VOICED_FLOOR_RMS, self.seg_peak * 10.0 ** (-VOICED_TAIL_DB / 20.0))
        if not (first or second) or rms < floor:
            return False
        self.seg_peak = max(self.seg_peak, rms)
        return True

    def _on_frame(
        self, frame: np.ndarray, now: float, defer: bool = False
    ) -> list[pb.ServerMessage]:
        t = self.frame
        self.arrival.append(now)
        self.frame += 1
        out = self._update_vad(t, self._voiced(frame), now)
        if defer:
            # 批次排程：只累積梅爾，區塊由 step_sessions 與其他會話一批編碼（encode_batch）。
            self.streamer.push_audio(frame, encode=False)
            return out
        t0 = time.perf_counter()
        user = self.streamer.push_audio(frame)
        self._queue_steps(user, time.perf_counter() - t0)
        return out

    def _update_vad(self, t: int, speech: bool, now: float) -> list[pb.ServerMessage]:
        s = self.s
        out: list[pb.ServerMessage] = []
        if speech:
            if self.speech_run == 0:
                self.run_start = t
            self.speech_run += 1
            self.silence_run = 0
            self.last_voiced = t
            if not self.user_active and self.speech_run >= s.onset_frames:
                self.user_active = True
                self.user_onset = self.run_start
                if self.turn is not None and not self.holding:
                    # 使用者在助理說話時開口：先停住助理音訊（模型照常產生），等判定。
                    self.holding = True
                    self.turn.hold_frame = t
            if self.holding and t - self.user_onset + 1 >= s.barge_in_frames:
                # 使用者語音長到不是附和：打斷，停住的音訊丟掉。
                self.yield_lock = True
                out += self._end_turn(t, yielded=True, onset=self.user_onset, detail="barge-in")
        else:
            self.silence_run += 1
            if self.silence_run >= BACKCHANNEL_GAP_FRAMES:
                self.speech_run = 0
                if not self.user_active:
                    self.seg_peak = 0.0
            if self.user_active:
                length = self.last_voiced - self.user_onset + 1
                if self.holding and self.silence_run >= BACKCHANNEL_GAP_FRAMES:
                    # 短語音結束：附和。放出停住的音訊，同一輪從停住處繼續。
                    self._end_segment()
                    out.append(self._backchannel(t, length))
                    out += self._release(t)
                elif self.silence_run >= s.end_silence_frames:
                    self._end_segment()
                    if self.turn is not None and length < s.backchannel_max_frames:
                        out.append(self._backchannel(t, length))
                    else:
                        self.user_spoke = True
                        self.yield_lock = False
        if s.policy == "vad":
            out += self._vad_policy(t, now)
        return out

    def _end_segment(self) -> None:
        self.user_active = False
        self.seg_peak = 0.0

    def _backchannel(self, t: int, length: int) -> pb.ServerMessage:
        return self._event(
            pb.Event.BACKCHANNEL, t, f"short user speech ({length} frames)", onset=self.user_onset
        )

    def _release(self, t: int) -> list[pb.ServerMessage]:
        """解除停住：依序放出停住的訊息；停住期間這一輪已產生完時接著結束它。"""
        out, self.held, self.holding = self.held, [], False
        if self.turn is not None and self.turn.done:
            out += self._end_turn(t, yielded=False)
        return out

    def _speak(self, msgs: list[pb.ServerMessage], frame: int) -> list[pb.ServerMessage]:
        """助理第 `frame` 幀的音訊與文字：停住時，停住那一幀起的先存起來，否則直接送出。

        模型路徑比快速路徑晚（區塊與前瞻），停住時可能還有停住之前的幀沒算完：它們照常送出
        （在使用者開口之前就該播的音訊），幀號順序不變。"""
        if self.holding and frame >= self.turn.hold_frame:
            self.held += msgs
            return []
        return msgs

    def _vad_policy(self, t: int, now: float) -> list[pb.ServerMessage]:
        out: list[pb.ServerMessage] = []
        if (
            self.turn is None
            and self.user_spoke
            and not self.user_active
            and not self.yield_lock
            and self.silence_run >= self.s.end_silence_frames
        ):
            # 靜音滿 end_silence 的這一幀就開口（模型路徑在這一幀之後才跑到它）。
            out += self._start_turn(t, now)
        turn = self.turn
        if turn is not None and not turn.done and t - turn.trigger_frame < self.s.max_reply_frames:
            self.plan[t] = turn.index
        return out

    # ---------------------------------------------------------------- 輪次

    def _start_turn(self, t: int, now: float) -> list[pb.ServerMessage]:
        self.turn = _Turn(self.turn_count, t, now)
        self.trigger_times[self.turn.index] = now
        self.turn_count += 1
        self.user_spoke = False
        return [self._event(pb.Event.SPEAKING, t, "assistant turn")]

    def _end_turn(
        self, t: int, yielded: bool, onset: int = -1, detail: str = ""
    ) -> list[pb.ServerMessage]:
        turn = self.turn
        if turn is None:
            return []
        out: list[pb.ServerMessage] = []
        if self.holding:
            # 打斷時停住的音訊丟掉；其他結束（finish、正常結尾）依序放出。
            if not yielded:
                out += self.held
            self.held, self.holding = [], False
        if turn.t2w is not None:
            if yielded:
                # 打斷：丟掉這一輪還沒解碼或還沒送出的音訊。
                turn.t2w, turn.audio_buf = None, np.zeros(0, np.float32)
            else:
                t0 = time.perf_counter()
                out += self._cosy_audio(turn, turn.t2w.finish(), final=True)
                turn.t2w = None
                turn.compute += time.perf_counter() - t0
        self.turn = None
        self.history.append(turn)
        self.trigger_times.pop(turn.index - HISTORY_TURNS, None)
        self.plan = {k: v for k, v in self.plan.items() if v != turn.index}
        turn.yielded = yielded
        if yielded:
            # 反應 = 起點 → 助理音訊停住（hold）的幀；沒停住（明確打斷、輪替頭）則到結束的幀。
            stop = turn.hold_frame if turn.hold_frame >= 0 else t
            turn.reaction_frames = stop - onset if onset >= 0 else -1
            out.append(self._event(pb.Event.YIELDED, t, detail or "yield", onset=onset))
        out.append(self._metrics(turn))
        out.append(self._event(pb.Event.LISTENING, t))
        return out

    def _metrics(self, turn: _Turn) -> pb.ServerMessage:
        secs = turn.frames * FRAME_SECONDS
        lat = (
            (turn.first_audio_time - turn.trigger_time) * 1000.0
            if turn.first_audio_frame >= 0
            else -1.0
        )
        m = pb.TurnMetrics(
            turn=turn.index,
            first_packet_latency_ms=lat,
            response_delay_frames=(
                turn.first_audio_frame - turn.trigger_frame if turn.first_audio_frame >= 0 else -1
            ),
            rtf=turn.compute / secs if secs > 0 else 0.0,
            audio_frames=turn.frames,
            audio_seconds=secs,
            compute_seconds=turn.compute,
            yielded=turn.yielded,
            barge_in_reaction_frames=turn.reaction_frames,
        )
        return pb.ServerMessage(metrics=m)

    def _event(self, kind: int, frame: int, detail: str = "", onset: int = -1) -> pb.ServerMessage:
        turn = self.turn.index if self.turn is not None else self.turn_count - 1
        return pb.ServerMessage(
            event=pb.Event(kind=kind, frame=frame, detail=detail, turn=turn, user_onset_frame=onset)
        )

    # ---------------------------------------------------------------- 模型路徑

    def _queue_steps(self, user: torch.Tensor, enc_seconds: float) -> None:
        """Streamer 新編好的使用者串流 `[1, k, d]` 排成待跑的模型步（最後補零的區塊只排到收到的幀）。"""
        count = min(user.shape[1], self.frame - self.model_frame - len(self.steps))
        if count <= 0:
            return
        f = self.model_frame + len(self.steps)
        for i in range(count):
            self.steps.append((f + i, user[:, i : i + 1], enc_seconds / count))

    def next_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """下一個待跑模型步的輸入：（使用者串流 `[1, 1, d]`, 上一幀的輸出 `prev`）。"""
        return self.steps[0][1], self.prev

    def after_step(
        self, f: int, res: dict[str, torch.Tensor], t0: float, enc_time: float
    ) -> _StepJob:
        """模型一步之後、解碼之前的輪替：策略、這一幀說不說；語音碼已產生時也排好要解碼的視窗
        （voila 說話的幀之後由 `fill_codes` 補上）。"""
        job = _StepJob(f, t0, enc_time)
        job.tok = int(res["text_ids"][0, 0])
        if self.turn is None and self.decider.speaking:
            self.decider.stop()  # 這一輪已由快速路徑（打斷）結束
        # 不在使用者有聲的幀上開口（快速路徑最近 BACKCHANNEL_GAP_FRAMES 幀內有語音）：否則輪替頭
        # 在使用者說話中途剛停又開口時，新的一輪沒有停住可用。
        quiet = self.silence_run >= BACKCHANNEL_GAP_FRAMES
        if self.user_spoke:
            self.decider.end_cooldown()  # 快速路徑判定使用者說完了：不再冷卻
        act = self.decider.step(
            res["turn"][0, 0].tolist(),
            allow_start=not self.yield_lock and quiet,
            overlap=self.holding,
        )
        if self.s.policy == "model":
            job.out += self._model_policy(f, act)
        job.speaking = (
            self.turn is not None
            and not self.turn.done
            and (self.s.policy == "model" or self.plan.get(f) == self.turn.index)
        )
        if "code_ids" in res:  # cosyvoice2：talker 每幀都要前進，模型步當場產生語音碼
            self.attach_codes(job, res["code_ids"][0, 0])
        elif job.speaking:
            job.hidden = res["hidden"]
        else:
            # 不說話：語音碼在下一幀的輸入裡被 codes_valid=False 遮成 0，填 0 即可
            self.attach_codes(job, torch.zeros_like(self.prev["codes"][0, 0]))
        return job

    def attach_codes(self, job: _StepJob, codes: torch.Tensor) -> None:
        """這一幀的語音碼 `[Q]` 到了：說話的幀記進輪次，排好要解碼的東西。"""
        eng = self.engine
        job.codes = codes.to(torch.long)
        job.hidden = None
        f = job.f
        if job.speaking:
            turn = self.turn
            turn.codes.append(job.codes.cpu().numpy())
            if eng.token2wav is not None:
                job.out += self._cosy_push(turn, f, int(job.codes[0]))
            elif self.s.decode_mode == "stream":
                job.window, job.turn = turn.codes[-1][:, None], turn
            else:
                job.window = np.stack(turn.codes[-self.s.decode_window_frames :], axis=1)

    def decode(self, jobs: list[_StepJob]) -> list[np.ndarray | None]:
        """Voila 解碼（各工作可來自不同會話）。串流解碼的工作一批解這一幀、各自的輪次狀態合成一批
        再拆回；視窗解碼的工作依視窗長度分組一批解，各取最後一幀的 640 個樣本。"""
        waves: list[np.ndarray | None] = [None] * len(jobs)
        stream = [
            i for i, job in enumerate(jobs) if job.window is not None and job.turn is not None
        ]
        if stream:
            dec = self.engine.voila.stream_decoder()
            turns = [jobs[i].turn for i in stream]
            for t in turns:
                if t.voila is None:
                    t.voila = dec.new_state(1)
            state = VoilaStreamState.cat([t.voila for t in turns])
            audio = dec.decode(state, np.stack([jobs[i].window for i in stream]))
            for t, row in zip(turns, state.split(), strict=True):
                t.voila = row
            for r, i in enumerate(stream):
                waves[i] = audio[r]
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.window is not None and job.turn is None:
                groups.setdefault(job.window.shape[1], []).append(i)
        for idx in groups.values():
            batch = np.stack([jobs[i].window for i in idx])
            audio = self.engine.voila.decode_codes(batch)
            for r, i in enumerate(idx):
                waves[i] = audio[r, -FRAME_SAMPLES:]
        return waves

    def finish_step(self, job: _StepJob, wave: np.ndarray | None) -> list[pb.ServerMessage]:
        """解碼之後：送出這一幀的音訊與文字、回饋給下一幀的輸入、這一輪是否產生完。"""
        eng = self.engine
        f, tok, out = job.f, job.tok, job.out
        if job.speaking:
            turn = self.turn
            if wave is not None:
                out += self._speak([self._audio(wave, SAMPLE_RATE, f)], f)
                if turn.first_audio_frame < 0:
                    turn.first_audio_frame = f
                    turn.first_audio_time = time.perf_counter()
            if tok not in eng.special_ids:
                piece = eng.tokenizer.decode([tok]) if eng.tokenizer is not None else ""
                text = pb.TextPartial(text=piece, token_ids=[tok], frame=f, turn=turn.index)
                out += self._speak([pb.ServerMessage(text=text)], f)
            turn.frames += 1
        self.prev = {
            "text": torch.tensor([[tok]], dtype=torch.long, device=eng.device),
            "tones": torch.zeros_like(self.prev["tones"]),
            "codes": job.codes.view(1, 1, -1),
            "codes_valid": torch.tensor([[job.speaking]], dtype=torch.bool, device=eng.device),
        }
        if self.turn is not None and job.speaking:
            self.turn.compute += time.perf_counter() - job.t0 + job.enc_time
            if (
                self.s.policy == "vad"
                and f - self.turn.trigger_frame >= self.s.max_reply_frames - 1
            ):
                out += self._turn_complete(f)
        self.model_frame = f + 1
        if self.steps and self.steps[0][0] == f:
            self.steps.popleft()
        if not self.steps:
            del self.arrival[: self.model_frame - self.arrival_base]
            self.arrival_base = self.model_frame
        return out

    def _turn_complete(self, f: int) -> list[pb.ServerMessage]:
        """這一輪產生完：停住中就等判定（附和時放出再結束，打斷時丟掉），否則直接結束。"""
        if self.holding:
            self.turn.done = True
            return []
        return self._end_turn(f, yielded=False)

    @staticmethod
    def _audio(wave: np.ndarray, rate: int, seq: int) -> pb.ServerMessage:
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return pb.ServerMessage(audio=pb.AudioChunk(pcm16=pcm, sample_rate=rate, seq=seq))

    def _cosy_push(self, turn: _Turn, f: int, token: int) -> list[pb.ServerMessage]:
        """cosyvoice2：這一幀的語音碼推進這一輪的 token2wav 串流，送出已解出的完整封包。"""
        if turn.t2w is None:
            turn.t2w = self.engine.token2wav.start_stream()
            turn.audio_start = f
        return self._cosy_audio(turn, turn.t2w.push([token]), final=False)

    def _cosy_audio(self, turn: _Turn, wave: np.ndarray, final: bool) -> list[pb.ServerMessage]:
        """把 24 kHz 波形接到緩衝後切成 40 ms 封包（`seq` = 這一輪第一個說話幀 + 封包序）；
        `final` 時最後不足一包的尾端補零送出。"""
        eng = self.engine
        n = eng.output_frame_samples
        buf = np.concatenate([turn.audio_buf, np.asarray(wave, np.float32)])
        if final and len(buf) % n:
            buf = np.concatenate([buf, np.zeros(n - len(buf) % n, np.float32)])
        out: list[pb.ServerMessage] = []
        while len(buf) >= n:
            seq = turn.audio_start + turn.packets
            out += self._speak([self._audio(buf[:n], eng.output_rate, seq)], seq)
            buf = buf[n:]
            turn.packets += 1
            if turn.first_audio_frame < 0:
                turn.first_audio_frame = seq
                turn.first_audio_time = time.perf_counter()
        turn.audio_buf = buf
        return out

    def _model_policy(self, f: int, act: int) -> list[pb.ServerMessage]:
        out: list[pb.ServerMessage] = []
        want = act in SPEAKING_ACTIONS and not self.yield_lock
        if self.turn is not None and self.user_active and act == YIELD_ACTION:
            self.yield_lock = True
            return self._end_turn(f, yielded=True, onset=self.user_onset, detail="turn head")
        if want and self.turn is None:
            arrival = self.arrival[f - self.arrival_base]
            self.turn = _Turn(self.turn_count, f, arrival)
            self.trigger_times[self.turn.index] = arrival
            self.turn_count += 1
            self.user_spoke = False
            out.append(self._event(pb.Event.SPEAKING, f, "assistant turn (turn head)"))
        elif not want and self.turn is not None and not self.turn.done:
            out += self._turn_complete(f)
        return out


def fill_codes(jobs: list[tuple[DuplexSession, _StepJob]]) -> None:
    """還沒有語音碼的工作（voila 說話的幀）以深度 Transformer 一批產生，交回各自的會話。"""
    need = [(s, job) for s, job in jobs if job.hidden is not None]
    if not need:
        return
    model = need[0][0].engine.model
    codes = model.frame_codes(torch.cat([job.hidden for _, job in need]))
    for r, (s, job) in enumerate(need):
        s.attach_codes(job, codes[r, 0])


def step_sessions(
    sessions: list[DuplexSession],
) -> tuple[dict[int, list[pb.ServerMessage]], dict[int, BaseException]]:
    """批次排程的一步：把各會話待跑的模型步一批前進，輪替策略仍在各會話裡。

    先把各會話已湊滿的編碼器區塊以 `encode_batch` 一批編碼（每列自己的框號）；之後每一輪取
    每個該跑模型步的會話（`DuplexSession.claim_step`）的下一幀，以 `step_batch` 一次前進（各自的
    LLM／talker 快取與 RoPE 位置；只有一個會話時直接 `Streamer.step`）；之後各會話做策略與說話
    判定，所有說話會話的 Voila 這一幀一批解碼（`DuplexSession.decode`），再各自送出。
    `spread_steps`（預設）時每個會話這一輪收到一幀就跑一步，區塊的兩幀分在相鄰的兩個 tick，
    所有會話每 tick 一輪；否則區塊的兩幀在同一 tick 的連續兩輪（第二幀的輸入是第一幀的輸出）。
    每個會話的結果與單獨 `feed` 逐幀相同（`tests/test_serving_batch.py`）。
    回傳（`id(會話)` → 訊息, `id(會話)` → 例外）：例外只結束該會話，其他會話照常。
    """
    out: dict[int, list[pb.ServerMessage]] = {id(s): [] for s in sessions}
    errors: dict[int, BaseException] = {}
    live = list(sessions)
    if live:
        # 各會話已湊滿的編碼器區塊一批編碼，排成待跑的模型步。
        t0 = time.perf_counter()
        try:
            users = encode_batch([s.streamer for s in live])
        except Exception as e:  # 批次失敗：逐會話重跑，讓出錯的只有該會話
            _warn_fallback("encode_batch", e)
            users = []
            for s in live:
                try:
                    users.append(encode_batch([s.streamer])[0])
                except Exception as e:
                    errors[id(s)] = e
                    users.append(None)
        share = (time.perf_counter() - t0) / len(live)
        for s, user in zip(live, users, strict=True):
            if user is not None:
                s._queue_steps(user, share)
    while True:
        ready = [s for s in live if id(s) not in errors and s.claim_step()]
        if not ready:
            break
        t0 = time.perf_counter()
        results: list[dict[str, torch.Tensor] | None] = []
        if len(ready) > 1:
            user = torch.cat([s.steps[0][1] for s in ready])
            prev = {k: torch.cat([s.prev[k] for s in ready]) for k in ready[0].prev}
            try:
                res = step_batch([s.streamer for s in ready], user, prev, codes=False, logits=False)
                results = [{k: v[r : r + 1] for k, v in res.items()} for r in range(len(ready))]
            except Exception as e:  # 批次失敗：逐會話重跑，讓出錯的只有該會話
                _warn_fallback("step_batch", e)
                results = []
        if not results:
            for s in ready:
                try:
                    results.append(
                        s.streamer.step(s.steps[0][1], s.prev, codes=False, logits=False)
                    )
                except Exception as e:
                    errors[id(s)] = e
                    results.append(None)
        share = (time.perf_counter() - t0) / len(ready)
        jobs: list[tuple[DuplexSession, _StepJob]] = []
        for s, res in zip(ready, results, strict=True):
            if res is None:
                continue
            try:
                f, _, enc_time = s.steps[0]
                jobs.append((s, s.after_step(f, res, time.perf_counter() - share, enc_time)))
            except Exception as e:
                errors[id(s)] = e
        if not jobs:
            continue
        try:
            fill_codes(jobs)
        except Exception as e:  # 批次失敗：逐會話重跑，讓出錯的只有該會話
            _warn_fallback("fill_codes", e)
            for s, job in jobs:
                try:
                    fill_codes([(s, job)])
                except Exception as e:
                    errors[id(s)] = e
            jobs = [(s, job) for s, job in jobs if id(s) not in errors]
            if not jobs:
                continue
        waves = jobs[0][0].decode([j for _, j in jobs])
        for (s, job), wave in zip(jobs, waves, strict=True):
            try:
                out[id(s)] += s.finish_step(job, wave)
            except Exception as e:
                errors[id(s)] = e
    for s in live:
        s.allow = 0  # 同 run_steps：收到的幀只在這一輪用
    return out, errors


def warm_up(engine: Engine, settings: SessionSettings, sessions: int) -> dict[str, float]:
    """開服前以 `sessions` 個靜音會話把批次路徑跑過一次，回傳（會話數, 常駐快取列數, 秒數）。

    常駐批次快取先長到這麼多列：之後會話陸續加入時不必在服務中倍增複製（完整模型在 GPU 上
    每次是數 GB）；第一個真正的批次 tick 也不必付第一次配置記憶體的成本（tiny 模型 32 個會話
    量到約 20 ms，全部會話一起晚這麼多）。跑 `chunk_frames` 的兩倍幀（編碼器區塊、LLM 幀步、
    深度 Transformer），串流 Voila 另以同樣的列數解兩幀零碼；cosyvoice2 的 token2wav 不在內。
    暖機會話用完即丟，列全部歸還，引擎的其他狀態不變（`tests/test_serving_batch.py`）。"""
    n = int(sessions)
    if n <= 0:
        return {"sessions": 0, "rows": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    live = [DuplexSession(engine, replace(settings)) for _ in range(n)]
    for _ in range(2 * max(1, int(settings.chunk_frames))):
        for s in live:
            s.feed(silence, 0.0, defer=True)
        _, errors = step_sessions(live)
        if errors:
            raise RuntimeError(f"暖機的批次步失敗：{next(iter(errors.values()))!r}")
    if engine.voila is not None and settings.decode_mode == "stream":
        dec = engine.voila.stream_decoder()
        state = dec.new_state(n)
        codes = np.zeros((n, engine.model.cfg.num_codebooks, 1), np.int64)
        for _ in range(2):
            dec.decode(state, codes)
    del live
    gc.collect()  # 會話的快取列由 weakref.finalize 歸還
    return {
        "sessions": n,
        "rows": engine.model.slot_cache().rows,
        "seconds": time.perf_counter() - t0,
    }
