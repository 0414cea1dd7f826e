"""批次排程：多個會話經 `step_sessions`（以及經真實伺服器的批次排程迴圈）得到的幀、事件與音訊，
與每個會話單獨跑完全相同；GPU 檢查腳本沒有 GPU 時明說；H100 紙上估算用設定中的 full 尺寸。
（准入與節流的測試在 `tests/test_serving_limits.py`。）"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from configs.serving import get_config
from export import text_argmax
from export.serving import duplex_pb2 as pb
from export.serving.client import stream_audio
from export.serving.server import ServerThread
from export.serving.session import (
    FALLBACKS,
    FRAME_SAMPLES,
    DuplexSession,
    SessionSettings,
    load_engine,
    step_sessions,
    warm_up,
)
from export.text_argmax import ScreenedArgmax
from export.torch_model import Streamer
from speakllm_jax.data.demo_corpus import synth


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """三段不同的使用者聲道：說一句 → 靜音（助理回話）→ 插話或附和 → 靜音。"""
    zh = synth("你好，請幫我查一下天氣。", "cmn")[:16000]
    en = synth("hello there", "en")[:12000]
    quiet = np.zeros(16000 * 2, np.float32)
    short = synth("嗯", "cmn")[:5600]
    return [
        np.concatenate([zh, quiet, zh[:8000], quiet]),
        np.concatenate([en, quiet[:20000], short, quiet]),
        np.concatenate([quiet[:4000], zh[:9600], quiet, quiet[:8000]]),
    ]


def settings(**over) -> SessionSettings:
    cfg = get_config()
    cfg.update(over)
    return SessionSettings.from_config(cfg)


def frames_of(x: np.ndarray) -> list[np.ndarray]:
    n = len(x) // FRAME_SAMPLES
    return [x[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(n)]


def canonical(msgs: list[pb.ServerMessage]) -> tuple[list[bytes], list[np.ndarray]]:
    """（訊息的位元組，去掉牆鐘量測與音訊樣本；各音訊封包的 PCM16 樣本）。"""
    out, pcm = [], []
    for m in msgs:
        m = pb.ServerMessage.FromString(m.SerializeToString())
        kind = m.WhichOneof("payload")
        if kind == "metrics":
            m.metrics.first_packet_latency_ms = 0.0
            m.metrics.rtf = 0.0
            m.metrics.compute_seconds = 0.0
        elif kind == "audio":
            pcm.append(np.frombuffer(m.audio.pcm16, "<i2").astype(np.int32))
            m.audio.pcm16 = b""
        out.append(m.SerializeToString(deterministic=True))
    return out, pcm


def assert_same(a: list[pb.ServerMessage], b: list[pb.ServerMessage]) -> None:
    """事件、文字、幀號、輪次量測逐位元組相同；音訊樣本至多差 PCM16 的 1 個量化階
    （批次解碼的浮點誤差 ≤ 1e-5，量化時偶爾跨過捨入邊界）。"""
    ma, pa = canonical(a)
    mb, pb_ = canonical(b)
    assert ma == mb
    assert len(pa) == len(pb_) and len(pa) > 20
    assert max(int(np.abs(x - y).max()) for x, y in zip(pa, pb_, strict=True)) <= 1


def run_alone(engine, clip: np.ndarray, **over) -> list[pb.ServerMessage]:
    """一個會話單獨逐幀跑完一段輸入的所有訊息。"""
    s = DuplexSession(engine, settings(**over))
    msgs = s.start_messages()
    for fr in frames_of(clip):
        msgs += s.feed(fr, 0.0)
    return msgs + s.finish()


def assert_identical(a: list[pb.ServerMessage], b: list[pb.ServerMessage]) -> None:
    """事件、文字、幀號、輪次量測與音訊樣本都逐位元組相同（同一條路徑、同樣的批次）。"""
    (ma, pa), (mb, pb_) = canonical(a), canonical(b)
    assert mb == ma and len(pb_) == len(pa) > 20
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb_, strict=True))


def run_batched(engine, clips, **over) -> tuple[list[list[pb.ServerMessage]], int]:
    """同樣的輸入經批次排程：不同時間開始（位置、快取長度、說話的時機都不同），每個 tick 每個
    會話一幀，模型一批前進。回傳（每個會話的訊息, 多個會話合成一批的 tick 數）。"""
    offsets = [0, 3, 7]
    sessions = [DuplexSession(engine, settings(**over)) for _ in clips]
    got = [s.start_messages() for s in sessions]
    per = [frames_of(c) for c in clips]
    ticks = max(o + len(p) for o, p in zip(offsets, per, strict=True))
    batched_rounds = 0
    for k in range(ticks + 1):
        active = []
        for i, s in enumerate(sessions):
            j = k - offsets[i]
            if 0 <= j < len(per[i]):
                got[i] += s.feed(per[i][j], 0.0, defer=True)
                active.append(s)
            elif j == len(per[i]):
                got[i] += s.finish()
        # 這一 tick 有多個會話湊滿編碼器區塊：編碼器與之後的模型步都是多列的一批。
        batched_rounds += sum(s.streamer.chunk_ready for s in active) > 1
        msgs, errors = step_sessions(active)
        assert not errors
        for i, s in enumerate(sessions):
            got[i] += msgs.get(id(s), [])
    return got, batched_rounds


@pytest.mark.parametrize("spread", [True, False])
def test_batched_sessions_equal_each_alone(engine, clips, spread) -> None:
    alone = [run_alone(engine, clip, spread_steps=spread) for clip in clips]
    got, batched_rounds = run_batched(engine, clips, spread_steps=spread)
    assert batched_rounds > 10  # 真的有多個會話合成一批
    for a, b in zip(alone, got, strict=True):
        assert_same(a, b)


def tick_advances(engine, clips, spread: bool) -> tuple[list[list[int]], list[int], list[int]]:
    """四個錯開一幀開始的會話經批次排程跑 60 個 tick：（每 tick 每個會話前進的模型步數,
    每 tick 的 step_batch 次數, 每 tick 之後最多的待跑模型步數）。"""
    from export.serving import session as session_mod

    calls = [0]
    real = session_mod.step_batch

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    sessions = [DuplexSession(engine, settings(spread_steps=spread)) for _ in range(4)]
    per = [frames_of(clips[i % 2]) for i in range(4)]
    adv, rounds, pending = [], [], []
    session_mod.step_batch = counted
    try:
        for k in range(61):
            active = []
            for i, s in enumerate(sessions):
                if 0 <= k - i % 2 < 60:
                    s.feed(per[i][k - i % 2], 0.0, defer=True)
                    active.append(s)
            before = [s.model_frame for s in sessions]
            calls[0] = 0
            _, errors = step_sessions(active)
            assert not errors
            adv.append([s.model_frame - b for s, b in zip(sessions, before, strict=True)])
            rounds.append(calls[0])
            pending.append(max(s.pending_steps for s in sessions))
    finally:
        session_mod.step_batch = real
    return adv, rounds, pending


def test_spread_steps_run_one_round_per_tick(engine, clips) -> None:
    """`spread_steps`：錯開開始的會話每 tick 各前進至多一步、一批一輪（區塊的第二幀到下一個 tick），
    待跑的步數至多 chunk_frames − 1；關掉時區塊湊滿的 tick 前進兩步、兩輪，下一個 tick 沒有。"""
    chunk = settings().chunk_frames
    assert chunk == 2
    adv, rounds, pending = tick_advances(engine, clips, spread=True)
    steady = range(10, 58)
    assert all(max(adv[k]) == 1 and rounds[k] == 1 for k in steady)
    assert max(pending) <= chunk - 1
    old_adv, old_rounds, old_pending = tick_advances(engine, clips, spread=False)
    assert any(max(old_adv[k]) == 2 for k in steady)
    assert any(old_rounds[k] == 2 for k in steady)
    assert max(old_pending) == 0
    # 步數不少：已跑的加上還待跑的（每個會話至多落後 chunk_frames − 1 步）等於一次跑完的。
    late = [sum(a) for a in zip(*adv, strict=True)]
    done = [sum(a) for a in zip(*old_adv, strict=True)]
    assert all(0 <= d - g <= chunk - 1 for d, g in zip(done, late, strict=True))


def test_spread_steps_keep_frames_and_events(engine, clips) -> None:
    """攤開模型步只改時機：同一段輸入的事件、文字與音訊的幀號、輪次量測與一次跑完區塊時相同。"""

    def run(spread: bool) -> list[bytes]:
        s = DuplexSession(engine, settings(spread_steps=spread))
        msgs = s.start_messages()
        for fr in frames_of(clips[0]):
            msgs += s.feed(fr, 0.0)
        msgs += s.finish()
        return sorted(canonical(msgs)[0])

    assert run(True) == run(False)


def test_warm_up_presizes_the_cache_and_changes_no_output(assets, clips) -> None:
    """暖機：常駐快取長到暖機的會話數、列全部歸還、沒有退回逐會話；之後的會話與暖機前逐位元組相同。"""
    engine = load_engine(*assets)  # 自己的引擎：要看快取列數從預設長起
    before = run_alone(engine, clips[1])
    pool = engine.model.slot_cache()
    rows = pool.rows
    fallbacks = dict(FALLBACKS)
    info = warm_up(engine, settings(), 2 * rows + 1)
    assert info["sessions"] == 2 * rows + 1
    assert pool.rows == info["rows"] >= 2 * rows + 1 > rows
    assert pool.free_slots() == set(range(pool.rows))  # 暖機會話的列都還回來了
    assert FALLBACKS == fallbacks
    assert warm_up(engine, settings(), 0)["sessions"] == 0
    assert_identical(before, run_alone(engine, clips[1]))


def test_codes_only_for_speaking_frames_change_nothing(engine, clips, monkeypatch) -> None:
    """voila 只替說話的幀跑深度 Transformer：與每幀都跑（舊做法）的事件、文字、音訊逐位元組相同，
    而深度 Transformer 只算了說話的幀（送出的音訊封包，加上插話時停住、沒送出的幾幀）。"""
    rows: list[int] = []
    depth = engine.model.depth_generate

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.shape[0])
        return depth(hidden)

    monkeypatch.setattr(engine.model, "depth_generate", counted)
    lazy = run_alone(engine, clips[0])
    lazy_rows, rows[:] = sum(rows), []
    step = Streamer.step

    def eager_step(self, *args, **kwargs):  # 舊做法：每個模型步都當場產生語音碼
        return step(self, *args, **{**kwargs, "codes": True})

    with monkeypatch.context() as m:
        m.setattr(Streamer, "step", eager_step)
        eager = run_alone(engine, clips[0])
    assert_identical(lazy, eager)
    sent = len(canonical(lazy)[1])  # 送出的音訊封包
    assert sent <= lazy_rows < sent + 10 < sum(rows) == len(frames_of(clips[0]))


def test_screened_text_argmax_changes_nothing(engine, clips, monkeypatch) -> None:
    """多個會話一批時，文字 argmax 以 bf16 篩選、候選精確重算（`ScreenedArgmax`）：與 fp32 全算
    logits 再取 argmax 的事件、文字、音訊逐位元組相同，而每個模型步（多列與單列）都走了篩選。"""
    monkeypatch.setattr(text_argmax, "bf16_supported", lambda: True)
    calls: list[tuple[int, int]] = []
    screened = ScreenedArgmax.__call__

    def counted(self, hidden):
        got = screened(self, hidden)
        applied = self.applies(hidden.reshape(-1, hidden.shape[-1]))
        calls.append((hidden.shape[0], self.candidates if applied else -1))
        return got

    with monkeypatch.context() as m:
        m.setattr(ScreenedArgmax, "__call__", counted)
        fast, _ = run_batched(engine, clips)
    multi = [c for n, c in calls if n > 1]
    single = [c for n, c in calls if n == 1]
    assert len(multi) > 10 and single and min(multi + single) >= 1
    with monkeypatch.context() as m:
        m.setattr(ScreenedArgmax, "applies", lambda self, hidden: False)
        full, _ = run_batched(engine, clips)
    for a, b in zip(fast, full, strict=True):
        assert_identical(a, b)


def test_batch_failure_falls_back_per_session_with_a_warning(engine, clips, caplog) -> None:
    """批次前進失敗（這裡：一個會話的快取不是常駐快取的列）時逐會話重跑：兩個會話都照常說話、
    沒有錯誤，並記一行警告與次數（不會悄悄變慢）。"""
    from export.serving import session as session_mod

    sessions = [DuplexSession(engine, settings()) for _ in range(2)]
    sessions[1].streamer.cache = engine.model.new_cache()  # transformers 的 DynamicCache
    got: list[list[pb.ServerMessage]] = [s.start_messages() for s in sessions]
    before = session_mod.FALLBACKS.get("step_batch", 0)
    per = [frames_of(c)[:60] for c in clips[:2]]
    with caplog.at_level("WARNING", logger="export.serving"):
        for k in range(60):
            for i, s in enumerate(sessions):
                got[i] += s.feed(per[i][k], 0.0, defer=True)
            msgs, errors = step_sessions(sessions)
            assert not errors
            for i, s in enumerate(sessions):
                got[i] += msgs.get(id(s), [])
    assert session_mod.FALLBACKS["step_batch"] > before
    assert any("step_batch 批次失敗" in r.getMessage() for r in caplog.records)
    assert [s.frame for s in sessions] == [60, 60]
    for msgs in got:
        assert sum(m.WhichOneof("payload") == "audio" for m in msgs) > 0


def test_window_decode_mode_keeps_frames_and_events(engine, clips) -> None:
    # 舊的視窗重解（decode_mode="window"）與預設的串流解碼：事件、文字、幀號相同，只有波形不同
    # （視窗截斷了 LSTM 與卷積的歷史）。
    runs = {}
    for mode in ("stream", "window"):
        s = DuplexSession(engine, SessionSettings(decode_mode=mode))
        msgs = s.start_messages()
        for fr in frames_of(clips[0]):
            msgs += s.feed(fr, 0.0)
        runs[mode] = canonical(msgs + s.finish())
    (ms, ps), (mw, pw) = runs["stream"], runs["window"]
    assert ms == mw and len(ps) == len(pw) > 20
    assert max(int(np.abs(x - y).max()) for x, y in zip(ps, pw, strict=True)) > 1


def test_batched_voila_decode_matches_single(engine) -> None:
    # 同長度的視窗一批解碼與逐一解碼的浮點波形相同（≤ 1e-5）。
    rng = np.random.default_rng(0)
    voila = engine.voila
    windows = rng.integers(0, voila.codebook_size, (5, voila.num_codebooks, 8))
    batch = voila.decode_codes(windows)
    for w, got in zip(windows, batch, strict=True):
        assert np.abs(voila.decode_codes(w) - got).max() <= 1e-5


def test_concurrent_sessions_over_loopback_equal_each_alone(assets, engine, clips) -> None:
    # 真實伺服器（批次排程、即時節流）：三個會話同時串流與各自單獨串流，收到的幀、事件、文字與
    # 輪次量測相同，音訊至多差 1 個量化階；同時跑的那次確實有多列的 tick。
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    with ServerThread(cfg, engine) as st:
        alone = [stream_audio(st.target, c, fast=True) for c in clips]
        st.server.servicer.ticks.clear()
        fallbacks = st.server.servicer.tick_summary()["batch_fallbacks"]
        got: list = [None] * len(clips)

        def one(i: int) -> None:
            got[i] = stream_audio(st.target, clips[i], fast=True)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clips))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        multi = max(n for n, _ in st.server.servicer.ticks)
        # 同時的會話真的一批前進，沒有退回逐會話。
        assert st.server.servicer.tick_summary()["batch_fallbacks"] == fallbacks
    assert multi > 1
    for a, b in zip(alone, got, strict=True):
        assert a.status == b.status == grpc.StatusCode.OK, (a.detail, b.detail)
        assert_same(a.messages, b.messages)


@pytest.mark.skipif(torch.cuda.is_available(), reason="有 GPU 時腳本會真的跑基準")
def test_gpu_check_says_plainly_without_gpu() -> None:
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "沒有可用的 CUDA GPU" in lines[0]


def test_paper_estimate_uses_full_preset_dims() -> None:
    # 設定中的 full 預設（8.03 B 參數）：批次越大每步讀的權重不變、KV 與 FLOPs 隨批次線性增長。
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paper_estimate

    dims = paper_estimate.model_dims("full")
    assert dims["llm_layers"] == 28 and dims["llm_hidden"] == 3584 and dims["llm_kv_heads"] == 4
    assert 7.9e9 < dims["params_total"] < 8.2e9
    one, many = (paper_estimate.step_cost(dims, b, 750) for b in (1, 32))
    assert many["bytes"]["weights_llm"] == one["bytes"]["weights_llm"]
    assert many["bytes"]["kv_llm"] == 32 * one["bytes"]["kv_llm"]
    assert many["gflops"] == pytest.approx(32 * one["gflops"])
    assert one["realtime"] and many["step_ms"] < 40.0
