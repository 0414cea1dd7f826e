"""全雙工語音對話的 gRPC 伺服器（grpc.aio）：每條雙向串流一個會話。

用法：`python -m export.serving.server --config serving --config.model_dir=DIR --config.voila_dir=DIR`
（其他欄位見 `configs/serving.py`，例如 `--config.device=cuda`、`--config.port=0` 隨機埠）。
以 `speech_head="cosyvoice2"` 匯出的模型改給 `--config.token2wav_dir=DIR`（CosyVoice2 的
`flow.pt`、`hift.pt`），助理音訊為 24 kHz；voila 模型仍是 Voila-Tokenizer 解碼的 16 kHz。
`--demo-assets DIR [--demo-head voila|cosyvoice2]` 先在 DIR 建立示範用的隨機小模型與對應的語音
解碼器（需要 JAX），並以它們啟動。

協定見 `duplex.proto`。錯誤狀態：

- 缺少、錯誤或重複的 `authorization` metadata → UNAUTHENTICATED；會話數已滿，或准入控制
  （`admission_headroom` > 0）判定再加一個會話會跟不上即時 → RESOURCE_EXHAUSTED；
  訊息超過 `max_message_bytes` → RESOURCE_EXHAUSTED（gRPC 本身）；關機中 → UNAVAILABLE。
- 第一則不是 START、奇數位元組、seq 不連續、取樣率不在 8000–192000 Hz、取樣率不合
  （`sample_rate_policy="reject"`）或中途改變、空訊息、無法解析的位元組 → INVALID_ARGUMENT。
- 超過 `idle_timeout_s` 沒有音訊（空片段不算）→ DEADLINE_EXCEEDED；音訊總長超過
  `max_session_seconds`（> 0 時；在解碼與重取樣之前以宣告的取樣率算）→ OUT_OF_RANGE。

每個會話一個讀取工作（抵達即記時間、驗證、解碼，放進會話自己的佇列）。計算依 `scheduler`：
`batched`（預設）為一個排程迴圈，每 40 ms 一個 tick 收集所有會話到期的幀（每幀不早於即時到期
時間，`pace_realtime`），快速路徑各自做、編碼器區塊與 LLM 幀步與 Voila 解碼各一批
（`session.step_sessions`）；`per_session` 為每個會話自己的計算工作（舊路徑）。送出迴圈把實際
送出的音訊封包數與送出時間寫回 `TurnMetrics`。
任何一個會話的錯誤都只結束該串流，伺服器繼續服務；客戶端消失時會話被取消並釋放。
關機（SIGTERM／SIGINT 或 `stop`）先拒絕新會話，讓進行中的會話在 `shutdown_grace_s` 內結束，
之後還在的會話各收到一個帶原因的 `SESSION_ENDED` 再關閉串流。
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from export.demo_assets import build_demo_assets
from export.serving import duplex_pb2 as pb
from export.serving import duplex_pb2_grpc as pb_grpc
from export.serving.session import (
    DECODE_MODES,
    FALLBACKS,
    FRAME_SAMPLES,
    FRAME_SECONDS,
    SAMPLE_RATE,
    DuplexSession,
    Engine,
    SessionError,
    SessionSettings,
    load_engine,
    step_sessions,
    warm_up,
)
from speakllm_jax.cli import ArgumentParser, UserFileError, UserValueError
from speakllm_jax.config import load_config
from speakllm_jax.cpu_simulation import configure_cpu_simulation

MIN_INPUT_RATE = 8000
MAX_INPUT_RATE = 192000
BACKLOG_MESSAGES = 64  # 每個會話讀進來但還沒處理的訊息上限（滿了就不再讀：gRPC 流量控制擋住客戶端）
COST_WINDOW = 256  # 准入控制：以最近這麼多次處理（跨會話）的計算時間估每幀成本
SCHEDULERS = ("batched", "per_session")
MAX_ROUNDS = 8  # 批次排程：落後時一個 tick 內至多補跑幾輪（每輪每個會話一幀），之後讓出事件迴圈
FRAME_LOG_SESSIONS = 32  # 伺服器記下最近這麼多個會話的每幀到期、抵達與計算時間（測試與基準用）


class _Abort:
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        self.code = code
        self.detail = detail


class _InputDecoder:
    """驗證並解碼客戶端的 PCM16 片段，必要時以串流重取樣器轉到 16 kHz。

    取樣率限 8000–192000 Hz；`max_samples`（> 0 時）是會話重取樣後的樣本上限，在解碼與重取樣之前
    以宣告的取樣率算出這則訊息之後的總樣本數來檢查，超過的訊息不配置任何記憶體。
    """

    def __init__(self, policy: str, max_samples: int = 0) -> None:
        if policy not in ("resample", "reject"):
            raise ValueError(f"sample_rate_policy={policy!r}；可用 resample、reject")
        self.policy = policy
        self.max_samples = int(max_samples)
        self.rate: int | None = None
        self.next_seq = 0
        self.in_samples = 0
        self.resampler: Any = None

    def decode(self, chunk: pb.AudioChunk) -> np.ndarray:
        if chunk.seq != self.next_seq:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"audio.seq 不連續：預期 {self.next_seq}，收到 {chunk.seq}（亂序或重送）",
            )
        self.next_seq += 1
        if len(chunk.pcm16) % 2:
            raise SessionError(
                "INVALID_ARGUMENT", f"audio.pcm16 位元組數為奇數（{len(chunk.pcm16)}），不是 PCM16"
            )
        rate = int(chunk.sample_rate)
        if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
            raise SessionError(
                "INVALID_ARGUMENT",
                f"audio.sample_rate={rate} 不支援（應在 {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz）",
            )
        if self.rate is None:
            if rate != SAMPLE_RATE and self.policy == "reject":
                raise SessionError(
                    "INVALID_ARGUMENT",
                    f"audio.sample_rate={rate}；伺服器只接受 {SAMPLE_RATE} Hz（sample_rate_policy=reject）",
                )
            self.rate = rate
        elif rate != self.rate:
            raise SessionError(
                "INVALID_ARGUMENT", f"audio.sample_rate 在會話中改變：{self.rate} → {rate}"
            )
        n = len(chunk.pcm16) // 2
        total = -(-(self.in_samples + n) * SAMPLE_RATE // rate)  # 重取樣後的總樣本數（上取整）
        if self.max_samples and total > self.max_samples:
            raise SessionError(
                "OUT_OF_RANGE",
                f"會話音訊超過 max_session_seconds={self.max_samples / SAMPLE_RATE:g} 秒",
            )
        self.in_samples += n
        x = np.frombuffer(chunk.pcm16, dtype="<i2").astype(np.float32) / 32768.0
        if rate != SAMPLE_RATE:
            if self.resampler is None:
                # 延後匯入：soxr 載入約 0.14 秒，只在來源取樣率不是 16 kHz 時需要
                import soxr

                self.resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
            x = self.resampler.resample_chunk(x)
        return np.asarray(x, np.float32)


class _Live:
    """一個進行中的會話在伺服器這邊的東西：送出佇列、待處理佇列、讀取與計算工作、量測。"""

    def __init__(self, session: DuplexSession) -> None:
        self.session = session
        self.out_q: asyncio.Queue = asyncio.Queue()
        self.work_q: asyncio.Queue = asyncio.Queue(maxsize=BACKLOG_MESSAGES)
        self.tasks: list[asyncio.Task] = []
        self.anchor: float | None = None  # 第 0 幀到期的時間（第一則音訊抵達時）
        self.fed = 0  # 已交給會話的 16 kHz 樣本數
        self.queued = 0  # 已讀進待處理佇列的 16 kHz 樣本數
        self.cur: list[Any] | None = None  # 批次排程：正在切成幀的訊息（樣本, 位置, 抵達時間）
        self.done = False  # 批次排程：已處理 END（或已被關閉），不再排程
        # 每幀的（即時到期, 抵達, 開始計算）時間：節流看得到、可測（不靠客戶端的牆鐘）。
        self.log: dict[str, list[float]] = {"due": [], "arrival": [], "run": []}

    def due(self, samples: int) -> float:
        """累計 `samples` 個樣本時最後一個完整幀的即時到期時間（第 0 幀在第一則音訊抵達時到期）。"""
        assert self.anchor is not None
        return self.anchor + (samples // FRAME_SAMPLES - 1) * FRAME_SECONDS


class DuplexServicer(pb_grpc.DuplexSpeechServicer):
    """`Converse`：驗證 → 准入 → 建立會話 → 讀取工作、計算工作（依即時節拍）與送出迴圈（本產生器）。

    讀取工作在訊息抵達時就記下時間、驗證與解碼，放進待處理佇列；計算工作依序處理，每一幀不早於它的
    即時到期時間（比即時快的客戶端被節流到即時，它的積壓只在自己的佇列裡，不佔其他會話的計算）。
    """

    def __init__(self, cfg: Any, engine: Engine, pool: ThreadPoolExecutor) -> None:
        self.cfg = cfg
        self.engine = engine
        self.pool = pool
        self.active = 0
        self.total = 0
        self.draining = False
        self.sessions_done = asyncio.Event()
        self.sessions_done.set()
        self.live: set[_Live] = set()
        self.costs: deque[tuple[int, float]] = deque(maxlen=COST_WINDOW)  # （幀數, 秒）
        self.scheduler = str(cfg.get("scheduler", "batched"))
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}；可用 {', '.join(SCHEDULERS)}")
        self.ticks: deque[tuple[int, float]] = deque(maxlen=COST_WINDOW)  # （會話幀數, tick 秒）
        self.frame_log: deque[dict[str, list[float]]] = deque(maxlen=FRAME_LOG_SESSIONS)
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        # 批次排程的模型計算只在這一個執行緒（所有會話一批）；事件迴圈照常收發。
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="sched")

    def _check_auth(self, context: grpc.aio.ServicerContext) -> str:
        """回傳錯誤說明（空字串表示通過）。重複的 `authorization` 一律拒絕。"""
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if len(values) > 1:
            return f"metadata authorization 重複 {len(values)} 次"
        token = str(self.cfg.auth_token)
        if token and (values[0] if values else "") != f"Bearer {token}":
            return "缺少或錯誤的 bearer token（metadata authorization）"
        return ""

    @property
    def measured_frames(self) -> int:
        return sum(n for n, _ in self.costs)

    @property
    def frame_cost(self) -> float:
        """最近量到的每幀計算秒數（含排隊等工作執行緒；0 表示還沒量到）。"""
        n = self.measured_frames
        return sum(t for _, t in self.costs) / n if n else 0.0

    def tick_summary(self) -> dict[str, float]:
        """最近量到的每幀計算毫秒與批次退回逐會話的次數；批次排程另有最近 `COST_WINDOW` 個有幀的
        tick 的計算毫秒 p50／p90／p99 與平均每 tick 的會話幀數。"""
        out: dict[str, float] = {
            "ticks": len(self.ticks),
            "frame_ms": self.frame_cost * 1000.0,
            # 批次編碼或前進失敗、退回逐會話的次數（本程序累計；應為 0）
            "batch_fallbacks": sum(FALLBACKS.values()),
        }
        if self.ticks:
            ms = np.array([t for _, t in self.ticks]) * 1000.0
            p50, p90, p99 = np.percentile(ms, [50, 90, 99])
            frames = float(np.mean([n for n, _ in self.ticks]))
            out.update(p50_ms=p50, p90_ms=p90, p99_ms=p99, frames=frames)
        return out

    def capacity(self) -> float:
        """依量到的每幀計算時間，能即時服務的會話數（還沒量到時為無限大）。

        批次排程只有一個計算迴圈：每個會話幀的成本 = tick 計算秒數 ÷ 這個 tick 的會話幀數
        （批次攤掉的固定成本已在裡面）；單一會話路徑乘上 `compute_workers`。"""
        if self.frame_cost <= 0:
            return float("inf")
        workers = 1 if self.scheduler == "batched" else max(1, int(self.cfg.compute_workers))
        return float(self.cfg.admission_headroom) * workers * FRAME_SECONDS / self.frame_cost

    def _admission_error(self) -> str:
        if self.active >= int(self.cfg.max_sessions):
            return f"會話數已達上限 max_sessions={self.cfg.max_sessions}"
        if float(self.cfg.admission_headroom) > 0 and self.active + 1 > self.capacity():
            return (
                f"再加一個會話會跟不上即時：量到每幀計算 {self.frame_cost * 1000:.1f} ms，"
                f"scheduler={self.scheduler}、compute_workers={self.cfg.compute_workers}、"
                f"admission_headroom={self.cfg.admission_headroom} 下最多 "
                f"{self.capacity():.1f} 個會話"
            )
        return ""

    async def Converse(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        auth = self._check_auth(context)
        if auth:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, auth)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "伺服器正在關機")
        full = self._admission_error()
        if full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, full)
        # 接受了：先送初始中繼資料，客戶端（例如網頁橋接）可以等到串流被接受才開始寫入。
        await context.send_initial_metadata(())
        self.active += 1
        self.total += 1
        self.sessions_done.clear()
        live: _Live | None = None
        try:
            deadline = time.perf_counter() + float(self.cfg.idle_timeout_s)
            first = await self._next(request_iterator, deadline)
            if first is None or not (
                first.WhichOneof("payload") == "control" and first.control.kind == pb.Control.START
            ):
                raise SessionError("INVALID_ARGUMENT", "第一則訊息必須是 Control{kind: START}")
            session = await self._run(self._new_session, first.control.options)
            live = _Live(session)
            self.live.add(live)
            if self.scheduler == "batched":
                self._ensure_loop()
            for m in session.start_messages():
                yield m
            live.tasks = [asyncio.ensure_future(self._read(live, request_iterator))]
            if self.scheduler != "batched":
                live.tasks.append(asyncio.ensure_future(self._work(live)))
            sent = _SentAudio(session)
            while True:
                msg = await live.out_q.get()
                if msg is None:
                    break
                if isinstance(msg, _Abort):
                    await context.abort(msg.code, msg.detail)
                sent.before_send(msg)
                yield msg
                sent.after_send(msg)
        except SessionError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.detail)
        finally:
            if live is not None:
                live.done = True
                self.live.discard(live)
                self.frame_log.append(live.log)
                await _cancel(live.tasks)
            self.active -= 1
            if self.active == 0:
                self.sessions_done.set()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _new_session(self, options: pb.SessionOptions) -> DuplexSession:
        settings = SessionSettings.from_config(self.cfg)
        if options.policy:
            settings.policy = options.policy
        if options.condition:
            settings.condition = options.condition
        return DuplexSession(self.engine, settings)

    async def _next(self, it: Any, deadline: float) -> pb.ClientMessage | None:
        try:
            wait = max(0.0, deadline - time.perf_counter())
            return await asyncio.wait_for(it.__anext__(), timeout=wait)
        except StopAsyncIteration:
            return None
        except DecodeError as e:
            raise SessionError(
                "INVALID_ARGUMENT", f"無法解析的訊息（不是 ClientMessage）：{e}"
            ) from e
        except TimeoutError as e:
            raise SessionError(
                "DEADLINE_EXCEEDED",
                f"超過 idle_timeout_s={self.cfg.idle_timeout_s} 秒沒有音訊（空片段不算）",
            ) from e

    @staticmethod
    def _put(out_q: asyncio.Queue, msgs: list[pb.ServerMessage]) -> None:
        for m in msgs:
            if m.WhichOneof("payload") == "event" and m.event.kind == pb.Event.YIELDED:
                # 打斷：丟掉還沒送出的助理音訊與文字。
                keep = []
                while not out_q.empty():
                    item = out_q.get_nowait()
                    if isinstance(item, pb.ServerMessage) and item.WhichOneof("payload") in (
                        "audio",
                        "text",
                    ):
                        continue
                    keep.append(item)
                for item in keep:
                    out_q.put_nowait(item)
            out_q.put_nowait(m)

    @staticmethod
    def _fail(live: _Live, e: SessionError) -> None:
        err = pb.ServerMessage(
            event=pb.Event(kind=pb.Event.ERROR, frame=live.session.frame, detail=e.detail)
        )
        live.out_q.put_nowait(err)
        live.out_q.put_nowait(_Abort(getattr(grpc.StatusCode, e.code), e.detail))

    async def _read(self, live: _Live, it: Any) -> None:
        """讀取工作：抵達即記時間、驗證、解碼，放進待處理佇列；錯誤立刻結束串流。"""
        limit = float(self.cfg.max_session_seconds)
        decoder = _InputDecoder(
            str(self.cfg.sample_rate_policy), round(limit * SAMPLE_RATE) if limit > 0 else 0
        )
        idle = float(self.cfg.idle_timeout_s)
        deadline = time.perf_counter() + idle
        try:
            while True:
                msg = await self._next(it, deadline)
                arrival = time.perf_counter()
                if msg is None:
                    await live.work_q.put(("end", None, arrival))
                    self.wake.set()
                    return
                kind = msg.WhichOneof("payload")
                if kind == "audio":
                    samples = decoder.decode(msg.audio)
                    if live.anchor is None and len(samples):
                        live.anchor = arrival
                    if len(samples):
                        live.queued += len(samples)
                        await live.work_q.put(("audio", samples, arrival))
                        self.wake.set()
                    if len(msg.audio.pcm16):
                        # 閒置計時只看真的音訊；節流中的積壓播完之前不算閒置。
                        backlog_end = live.due(live.queued) if live.anchor is not None else 0.0
                        deadline = max(time.perf_counter(), backlog_end) + idle
                elif kind == "control":
                    if msg.control.kind == pb.Control.END:
                        await live.work_q.put(("end", None, arrival))
                        self.wake.set()
                        return
                    if msg.control.kind == pb.Control.INTERRUPT:
                        await live.work_q.put(("interrupt", None, arrival))
                        self.wake.set()
                    else:
                        raise SessionError("INVALID_ARGUMENT", "會話中重複的 Control{kind: START}")
                else:
                    raise SessionError("INVALID_ARGUMENT", "ClientMessage 沒有 audio 或 control")
        except SessionError as e:
            self._fail(live, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # 任何意外都只結束這個會話
            live.out_q.put_nowait(_Abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))

    async def _work(self, live: _Live) -> None:
        """計算工作：依序處理待處理佇列；每一幀等到它的即時到期時間（`pace_realtime`）才算。"""
        session = live.session
        pace = bool(self.cfg.pace_realtime)
        try:
            while True:
                kind, samples, arrival = await live.work_q.get()
                if kind == "end":
                    self._put(live.out_q, await self._run(session.finish))
                    break
                if kind == "interrupt":
                    self._put(live.out_q, await self._run(session.interrupt))
                    continue
                pos = 0
                while pos < len(samples):
                    # 每塊剛好補滿下一幀（第一塊可能補的是上一則留下的不完整幀）。
                    take = FRAME_SAMPLES - live.fed % FRAME_SAMPLES
                    piece = samples[pos : pos + take]
                    pos += len(piece)
                    live.fed += len(piece)
                    due = live.due(live.fed)
                    if pace:
                        wait = due - time.perf_counter()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    # 比即時快送來的幀，以它的即時到期時間當作抵達時間。
                    stamp = max(arrival, due)
                    if live.fed // FRAME_SAMPLES > (live.fed - len(piece)) // FRAME_SAMPLES:
                        self._log(live, due, arrival)
                    frames = session.frame
                    t0 = time.perf_counter()
                    msgs = await self._run(session.feed, piece, stamp)
                    self._measure(session.frame - frames, time.perf_counter() - t0)
                    self._put(live.out_q, msgs)
        except SessionError as e:
            self._fail(live, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # 任何意外都只結束這個會話
            live.out_q.put_nowait(_Abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
        live.out_q.put_nowait(None)

    def _log(self, live: _Live, due: float, arrival: float) -> None:
        live.log["due"].append(due)
        live.log["arrival"].append(arrival)
        live.log["run"].append(time.perf_counter())

    # ---------------------------------------------------------------- 批次排程

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.ensure_future(self._schedule())

    async def _schedule(self) -> None:
        """批次排程迴圈：每 40 ms 一個 tick，收集所有會話到期的幀，快速路徑各自做、模型一批前進。

        tick 落在固定的 40 ms 格點上（`pace_realtime=False` 時不等，有事就做）；每個會話每輪至多
        一幀，落後時同一 tick 內再補跑（至多 `MAX_ROUNDS` 輪），所以比即時快的會話的積壓
        只在自己的佇列裡，不會讓其他會話等。"""
        loop = asyncio.get_running_loop()
        pace = bool(self.cfg.pace_realtime)
        next_tick = time.perf_counter()
        while True:
            rounds = 0
            while rounds < MAX_ROUNDS:
                now = time.perf_counter()
                work = [(live, self._take(live, now, pace)) for live in list(self.live)]
                work = [(live, ops) for live, ops in work if ops]
                if not work:
                    break
                t0 = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.compute, _run_tick, work)
                except Exception as e:  # 意外：只結束這一輪的會話，迴圈繼續
                    results = [([], e, 0, False) for _ in work]
                seconds = time.perf_counter() - t0
                frames = 0
                for (live, _), (msgs, err, n, end) in zip(work, results, strict=True):
                    frames += n
                    if live.done and not end:
                        continue  # 已被關閉（關機、客戶端消失）
                    self._put(live.out_q, msgs)
                    if err is not None:
                        live.done = True
                        if isinstance(err, SessionError):
                            self._fail(live, err)
                        else:
                            live.out_q.put_nowait(
                                _Abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
                            )
                        live.out_q.put_nowait(None)
                    elif end:
                        live.out_q.put_nowait(None)
                if frames:
                    self.ticks.append((frames, seconds))
                    self._measure(frames, seconds)
                rounds += 1
            if not self.live:
                return  # 沒有會話：迴圈結束，下一個會話開始時再啟動
            now = time.perf_counter()
            if pace:
                # 固定的 40 ms 格點；落後時不累積欠帳，補跑滿 MAX_ROUNDS 輪時只讓出事件迴圈。
                next_tick = max(next_tick + FRAME_SECONDS, now - FRAME_SECONDS)
                wait = 0.0 if rounds >= MAX_ROUNDS else next_tick - now
                await asyncio.sleep(max(0.0, wait))
            elif rounds == 0:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=FRAME_SECONDS)
            else:
                await asyncio.sleep(0)

    def _take(self, live: _Live, now: float, pace: bool) -> list[tuple]:
        """這一輪要交給會話的東西（依序）：控制訊息與切好的音訊片段，至多完成一幀；
        完成的幀還沒到即時到期時間（`pace`）就留到之後的 tick。"""
        ops: list[tuple] = []
        if live.done:
            return ops
        while True:
            if live.cur is None:
                if live.work_q.empty():
                    break
                kind, samples, arrival = live.work_q.get_nowait()
                if kind != "audio":
                    ops.append((kind,))
                    if kind == "end":
                        break
                    continue
                live.cur = [samples, 0, arrival]
            samples, pos, arrival = live.cur
            take = FRAME_SAMPLES - live.fed % FRAME_SAMPLES
            piece = samples[pos : pos + take]
            fed = live.fed + len(piece)
            completes = fed // FRAME_SAMPLES > live.fed // FRAME_SAMPLES
            due = live.due(fed)
            if completes and pace and due > now:
                break
            live.fed = fed
            live.cur = None if pos + len(piece) >= len(samples) else [samples, pos + take, arrival]
            # 比即時快送來的幀，以它的即時到期時間當作抵達時間。
            ops.append(("audio", piece, max(arrival, due)))
            if completes:
                self._log(live, due, arrival)
                break
        if ops and ops[-1][0] == "end":
            live.done = True
        return ops

    def _measure(self, frames: int, seconds: float) -> None:
        if frames > 0:
            self.costs.append((frames, seconds))

    async def close_all(self, reason: str) -> None:
        """結束所有進行中的會話：停下讀取與計算，送出帶原因的 `SESSION_ENDED` 後關閉串流。"""
        for live in list(self.live):
            live.done = True
            await _cancel(live.tasks)
            for m in live.session.close_messages(reason):
                live.out_q.put_nowait(m)
            live.out_q.put_nowait(None)


def _run_tick(work: list[tuple[_Live, list[tuple]]]) -> list[tuple[list, Any, int, bool]]:
    """批次排程一輪（在計算執行緒）：各會話依序吃這一輪的片段與控制（快速路徑、編碼），
    再以 `step_sessions` 一批跑模型步。回傳每個會話的（訊息, 例外, 這一輪收到的幀數, 是否結束）。"""
    res: list[list[Any]] = []
    for live, ops in work:
        s = live.session
        msgs: list[pb.ServerMessage] = []
        err: BaseException | None = None
        end = False
        before = s.frame
        try:
            for op in ops:
                if op[0] == "audio":
                    msgs += s.feed(op[1], op[2], defer=True)
                elif op[0] == "interrupt":
                    msgs += s.run_steps() + s.interrupt()
                else:
                    msgs += s.run_steps() + s.finish()
                    end = True
        except Exception as e:  # 只結束這個會話
            err = e
        res.append([msgs, err, before, end])
    ready = [live.session for (live, _), r in zip(work, res, strict=True) if r[1] is None]
    out, errors = step_sessions(ready)
    for (live, _), r in zip(work, res, strict=True):
        s = live.session
        r[0] += out.get(id(s), [])
        if r[1] is None:
            r[1] = errors.get(id(s))
        r[2] = s.frame - r[2]
    return [tuple(r) for r in res]


class _SentAudio:
    """送出迴圈的量測：每輪實際送出的音訊封包數與第一個封包送出的時間，改寫 `TurnMetrics`。"""

    def __init__(self, session: DuplexSession) -> None:
        self.session = session
        self.turn = -1
        self.count: dict[int, int] = {}
        self.first: dict[int, float] = {}

    def before_send(self, msg: pb.ServerMessage) -> None:
        kind = msg.WhichOneof("payload")
        if kind == "event" and msg.event.kind == pb.Event.SPEAKING:
            self.turn = msg.event.turn
        elif kind == "metrics":
            m = msg.metrics
            n = self.count.pop(m.turn, 0)
            first = self.first.pop(m.turn, None)
            trigger = self.session.trigger_times.get(m.turn)
            m.audio_frames = n
            m.audio_seconds = n * FRAME_SECONDS
            m.first_packet_latency_ms = (
                (first - trigger) * 1000.0 if first is not None and trigger is not None else -1.0
            )

    def after_send(self, msg: pb.ServerMessage) -> None:
        if msg.WhichOneof("payload") == "audio" and self.turn >= 0:
            self.count[self.turn] = self.count.get(self.turn, 0) + 1
            self.first.setdefault(self.turn, time.perf_counter())


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        if not t.done():
            t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


class DuplexServer:
    """可在程式內啟停的伺服器（測試與 CLI 共用）。"""

    def __init__(self, cfg: Any, engine: Engine | None = None) -> None:
        self.cfg = cfg
        torch.set_num_threads(max(1, int(cfg.torch_threads)))
        self.engine = engine or load_engine(
            cfg.model_dir,
            cfg.get("voila_dir", ""),
            cfg.device,
            cfg.dtype,
            cfg.attn_implementation,
            token2wav_dir=cfg.get("token2wav_dir", ""),
        )
        self.pool = ThreadPoolExecutor(max(1, int(cfg.compute_workers)))
        self.server: grpc.aio.Server | None = None
        self.servicer: DuplexServicer | None = None
        self.port = 0

    async def start(self) -> int:
        n = int(self.cfg.max_message_bytes)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", n),
                ("grpc.max_send_message_length", max(n, 4 * 1024 * 1024)),
            ]
        )
        self.servicer = DuplexServicer(self.cfg, self.engine, self.pool)
        pb_grpc.add_DuplexSpeechServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{int(self.cfg.port)}")
        if self.port == 0:
            raise RuntimeError(f"無法綁定 {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        return self.port

    def warm_up(self) -> dict[str, float]:
        """設定 `warmup` 時以 `max_sessions` 個靜音會話先跑一次批次路徑（`session.warm_up`）並印出
        結果：常駐快取先長到這麼多列，第一批真正的會話不付第一次配置的成本。入口在開始監聽前呼叫。"""
        n = int(self.cfg.max_sessions) if bool(self.cfg.warmup) else 0
        info = warm_up(self.engine, SessionSettings.from_config(self.cfg), n)
        if info["sessions"]:
            print(
                f"warm-up: {int(info['sessions'])} sessions, {int(info['rows'])} cache rows, "
                f"{info['seconds']:.2f} s",
                flush=True,
            )
        return info

    @property
    def active_sessions(self) -> int:
        return 0 if self.servicer is None else self.servicer.active

    async def stop(self, grace: float | None = None) -> None:
        """先拒絕新會話，等進行中的會話結束（至多 grace 秒），再停止。"""
        if self.server is None:
            return
        g = float(self.cfg.shutdown_grace_s if grace is None else grace)
        if self.servicer is not None:
            self.servicer.draining = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.servicer.sessions_done.wait(), timeout=g)
            # 寬限期後還在的會話：各送一個帶原因的 SESSION_ENDED 再關閉串流。
            await self.servicer.close_all("server shutdown: session closed by the server")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.servicer.sessions_done.wait(), timeout=5.0)
        await self.server.stop(0)
        if self.servicer is not None and self.servicer.loop_task is not None:
            await _cancel([self.servicer.loop_task])
            self.servicer.compute.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)


class LoopThread:
    """在背景執行緒的事件迴圈裡跑一個有 async `start()`／`stop(grace)` 的伺服器（測試與內嵌用）。"""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _start(self) -> Any:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def stop(self, grace: float | None = None) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __exit__(self, *exc: Any) -> None:
        self.stop(0)


class ServerThread(LoopThread):
    """在背景執行緒的事件迴圈裡跑 `DuplexServer`（測試用）。"""

    def __init__(self, cfg: Any, engine: Engine | None = None) -> None:
        super().__init__(DuplexServer(cfg, engine))
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.port = self._start()
        return self

    @property
    def target(self) -> str:
        return f"{self.server.cfg.host}:{self.port}"


def freeze_loaded_objects() -> int:
    """模型、分詞器載入之後呼叫：先回收一次，再把現有的物件移出循環 GC 的追蹤（`gc.freeze`）。

    載入後有約 40 萬個一直活著的 Python 物件，否則之後每次完整回收都要掃過它們（這台 CPU 上一次
    約 0.2 秒，所有會話的 tick 同時停住那麼久）；凍結後完整回收只看新物件。凍結的物件仍由參照
    計數釋放。只在伺服器行程的進入點呼叫（測試在同一行程裡建很多伺服器，不凍結）。回傳凍結的物件數。"""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _serve(cfg: Any) -> None:
    server = DuplexServer(cfg)
    server.warm_up()
    freeze_loaded_objects()
    port = await server.start()
    print(f"listening on {cfg.host}:{port}", flush=True)
    await wait_for_stop_signal()
    ticks = server.servicer.tick_summary() if server.servicer is not None else {}
    await server.stop()
    print(f"tick stats: {json.dumps(ticks)}", flush=True)
    print("stopped", flush=True)


def use_demo_assets(cfg: Any, folder: str, speech_head: str = "voila") -> None:
    """在 `folder` 建（或沿用）示範模型與解碼器，並把路徑寫進服務設定（伺服器與網頁橋接共用）。"""
    configure_cpu_simulation()  # 示範模型以 JAX 建立
    model_dir, dec_dir = build_demo_assets(folder, speech_head=speech_head)
    with cfg.unlocked():
        cfg.model_dir = str(model_dir)
        if speech_head == "cosyvoice2":
            cfg.token2wav_dir = str(dec_dir)
        else:
            cfg.voila_dir = str(dec_dir)


def check_model_paths(cfg: Any) -> None:
    """啟動前檢查模型與語音解碼器的資料夾，錯誤時拋出指出設定欄位的 `UserError`。"""
    demo = "，或以 --demo-assets DIR 使用示範模型"
    if not str(cfg.model_dir):
        raise UserValueError(
            f"--config.model_dir 是空的：需要 python -m export.to_torch 匯出的資料夾{demo}"
        )
    heads = Path(cfg.model_dir) / "heads_config.json"
    if not heads.is_file():
        raise UserFileError(
            f"--config.model_dir={cfg.model_dir}：找不到 {heads.name}，"
            f"需要 python -m export.to_torch 匯出的資料夾{demo}"
        )
    head = json.loads(heads.read_text(encoding="utf-8")).get("speech_head", "")
    if head == "voila":
        field, need = "voila_dir", ("config.json",)
        what = "Voila-Tokenizer（EncodecModel）資料夾"
    elif head == "cosyvoice2":
        field, need = "token2wav_dir", ("flow.pt", "hift.pt")
        what = "CosyVoice2 token2wav 資料夾（flow.pt、hift.pt）"
    else:
        raise UserValueError(
            f"--config.model_dir={cfg.model_dir}：模型沒有語音頭（speech_head={head!r}），"
            "不能做語音對話；請匯出第 1–3 階段的執行"
        )
    value = str(cfg[field])
    if not value:
        raise UserValueError(f"--config.{field} 是空的：speech_head={head!r} 需要{what}{demo}")
    for name in need:
        if not (Path(value) / name).is_file():
            raise UserFileError(f"--config.{field}={value}：找不到 {name}，需要{what}")


def serving_args(prog: str, description: str, argv: list[str] | None) -> tuple[Any, Any]:
    """伺服器與網頁橋接共用的命令列：`--config`、`--demo-assets`、`--demo-head` 與 `--config.x=y`；
    回傳（旗標, 讀好的服務設定）。"""
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default="serving", help="設定名稱或 .py 路徑（預設 serving）")
    p.add_argument("--demo-assets", default="", help="在此資料夾建立並使用示範模型（需要 JAX）")
    p.add_argument(
        "--demo-head",
        default="voila",
        choices=("voila", "cosyvoice2"),
        help="示範模型的語音頭（cosyvoice2 另建隨機 tiny token2wav）",
    )
    args, rest = p.parse_known_args(argv)
    return args, load_config(args.config, rest)


async def wait_for_stop_signal() -> None:
    """等到 SIGTERM 或 SIGINT，印出開始收尾（伺服器與網頁橋接共用）。"""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down: draining sessions", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, cfg = serving_args("python -m export.serving.server", "全雙工語音對話 gRPC 伺服器", argv)
    if cfg.decode_mode not in DECODE_MODES:
        raise UserValueError(
            f"--config.decode_mode={cfg.decode_mode!r}：可用 {', '.join(DECODE_MODES)}"
        )
    if args.demo_assets:
        use_demo_assets(cfg, args.demo_assets, args.demo_head)
    check_model_paths(cfg)
    asyncio.run(_serve(cfg))
    return 0


if __name__ == "__main__":
    from speakllm_jax.cli import run_cli

    sys.exit(run_cli(main))
