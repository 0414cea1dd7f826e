"""服務的限制與錯誤輸入：驗證、會話數、訊息大小、會話長度、閒置、取樣率、亂序、奇數位元組、
無法解析的位元組、客戶端消失與優雅關機。每個錯誤都得到明確的狀態碼，伺服器繼續服務。"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving import duplex_pb2_grpc as pb_grpc
from export.serving.client import stream_audio, to_pcm16
from export.serving.server import ServerThread
from speakllm_jax.data.demo_corpus import synth

TOKEN = "s3cret"
METHOD = "/speakllm.duplex.DuplexSpeech/Converse"


def make_cfg(assets, **kw):
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def strict(assets, engine):
    cfg = make_cfg(
        assets,
        auth_token=TOKEN,
        max_sessions=2,
        max_message_bytes=64 * 1024,
        max_session_seconds=3.0,
        idle_timeout_s=1.0,
        sample_rate_policy="reject",
    )
    with ServerThread(cfg, engine) as st:
        yield st


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synth("你好，請幫我查一下天氣。", "cmn")[:16000]


def start_msg(**kw) -> pb.ClientMessage:
    return pb.ClientMessage(
        control=pb.Control(kind=pb.Control.START, options=pb.SessionOptions(**kw))
    )


def audio_msg(pcm: bytes, seq: int, rate: int = 16000) -> pb.ClientMessage:
    return pb.ClientMessage(audio=pb.AudioChunk(pcm16=pcm, sample_rate=rate, seq=seq))


def call(target: str, msgs: list[pb.ClientMessage], token: str | None = TOKEN):
    """送出固定的訊息串列，回傳（狀態碼, 說明, 收到的訊息）。"""
    md = [("authorization", f"Bearer {token}")] if token else None
    got = []
    with grpc.insecure_channel(target) as ch:
        try:
            for m in pb_grpc.DuplexSpeechStub(ch).Converse(iter(msgs), metadata=md, timeout=30):
                got.append(m)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", got
    return grpc.StatusCode.OK, "", got


def wait_idle(st: ServerThread, timeout: float = 10.0) -> int:
    """等伺服器把結束的會話釋放（客戶端可能比伺服器的清理先拿到狀態）。"""
    deadline = time.time() + timeout
    while st.server.active_sessions and time.time() < deadline:
        time.sleep(0.02)
    return st.server.active_sessions


def assert_alive(st: ServerThread, speech: np.ndarray) -> None:
    res = stream_audio(st.target, speech, fast=True, tail_seconds=1.5, token=TOKEN)
    assert res.status == grpc.StatusCode.OK, res.detail
    assert len(res.of("audio")) > 0


def test_auth(strict, speech) -> None:
    for token in (None, "wrong"):
        res = stream_audio(strict.target, speech, token=token or "")
        assert res.status == grpc.StatusCode.UNAUTHENTICATED
    assert_alive(strict, speech)


@pytest.mark.parametrize(
    "msgs, code, words",
    [
        ([audio_msg(b"\0\0", 0)], grpc.StatusCode.INVALID_ARGUMENT, "START"),
        ([start_msg(), audio_msg(b"\0" * 641, 0)], grpc.StatusCode.INVALID_ARGUMENT, "奇數"),
        (
            [start_msg(), audio_msg(b"\0" * 640, 0), audio_msg(b"\0" * 640, 2)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "seq",
        ),
        ([start_msg(), audio_msg(b"\0" * 640, 0, 8000)], grpc.StatusCode.INVALID_ARGUMENT, "8000"),
        ([start_msg(), audio_msg(b"\0" * 640, 0, -5)], grpc.StatusCode.INVALID_ARGUMENT, "-5"),
        (
            [start_msg(), audio_msg(b"\0" * 640, 0, 7999)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.sample_rate=7999",
        ),
        (
            [start_msg(), audio_msg(b"\0" * 640, 0, 192001)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.sample_rate=192001",
        ),
        ([start_msg(), pb.ClientMessage()], grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        ([start_msg(), start_msg()], grpc.StatusCode.INVALID_ARGUMENT, "START"),
        ([start_msg(policy="psychic")], grpc.StatusCode.INVALID_ARGUMENT, "psychic"),
        ([start_msg(condition="<|no_such|>")], grpc.StatusCode.INVALID_ARGUMENT, "no_such"),
        (
            [start_msg(), audio_msg(b"\0" * 100_000, 0)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
        (
            [start_msg()] + [audio_msg(b"\0" * 32000, i) for i in range(4)],
            grpc.StatusCode.OUT_OF_RANGE,
            "max_session_seconds",
        ),
    ],
    ids=[
        "no-start",
        "odd-bytes",
        "out-of-order",
        "wrong-rate",
        "bad-rate",
        "rate-too-low",
        "rate-too-high",
        "empty",
        "double-start",
        "bad-policy",
        "bad-condition",
        "too-big",
        "too-long",
    ],
)
def test_bad_input_gets_clear_status(strict, speech, msgs, code, words) -> None:
    got_code, detail, got = call(strict.target, msgs)
    assert got_code == code, detail
    assert words in detail
    assert wait_idle(strict) == 0


def test_garbage_bytes_and_server_survives(strict, speech) -> None:
    md = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(strict.target) as ch:
        raw = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(iter([b"\xff\xfe garbage \x00\x01" * 8]), metadata=md, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ClientMessage" in e.value.details()
    assert_alive(strict, speech)


def test_idle_timeout(strict) -> None:
    def slow() -> Iterator[pb.ClientMessage]:
        yield start_msg()
        time.sleep(2.0)
        yield audio_msg(b"\0" * 640, 0)

    md = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(strict.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.DuplexSpeechStub(ch).Converse(slow(), metadata=md, timeout=10))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle" in e.value.details()


class HeldStream:
    """開著的會話：送 START 與一點音訊後等待，`release` 後送 END。"""

    def __init__(self, target: str, chunks: int = 3, token: str | None = TOKEN) -> None:
        self.go = threading.Event()
        self.chunks = chunks
        self.ch = grpc.insecure_channel(target)
        md = [("authorization", f"Bearer {token}")] if token else None
        self.call = pb_grpc.DuplexSpeechStub(self.ch).Converse(self._reqs(), metadata=md)
        self.first = next(self.call)  # SESSION_STARTED：會話已建立

    def _reqs(self) -> Iterator[pb.ClientMessage]:
        yield start_msg()
        for i in range(self.chunks):
            yield audio_msg(to_pcm16(np.zeros(640, np.float32)), i)
        self.go.wait(30)
        yield pb.ClientMessage(control=pb.Control(kind=pb.Control.END))

    def finish(self) -> tuple[grpc.StatusCode, list[pb.ServerMessage]]:
        self.go.set()
        try:
            rest = list(self.call)
            return grpc.StatusCode.OK, rest
        except grpc.RpcError as e:
            return e.code(), []
        finally:
            self.ch.close()


def test_max_sessions(strict, speech) -> None:
    assert wait_idle(strict) == 0
    held = [HeldStream(strict.target) for _ in range(2)]
    assert strict.server.active_sessions == 2
    code, detail, _ = call(strict.target, [start_msg()])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in detail
    for h in held:
        code, rest = h.finish()
        assert code == grpc.StatusCode.OK and rest[-1].event.kind == pb.Event.SESSION_ENDED
    assert_alive(strict, speech)


def test_vanished_client_frees_session(strict, speech) -> None:
    assert wait_idle(strict) == 0
    h = HeldStream(strict.target)
    assert strict.server.active_sessions == 1
    h.call.cancel()  # 客戶端消失（不送 END）
    h.ch.close()
    assert wait_idle(strict) == 0
    assert_alive(strict, speech)


def test_resample_policy_accepts_other_rates(assets, engine, speech) -> None:
    import soxr

    cfg = make_cfg(assets, sample_rate_policy="resample")
    with ServerThread(cfg, engine) as st:
        ref = stream_audio(st.target, speech, fast=True, tail_seconds=1.5)
        wave8k = soxr.resample(speech, 16000, 8000)
        res = stream_audio(st.target, wave8k, 8000, fast=True, tail_seconds=1.5)
    assert ref.status == res.status == grpc.StatusCode.OK, res.detail
    # 8 kHz 輸入經串流重取樣後，輪替時間與 16 kHz 輸入相近。
    a = ref.events(pb.Event.SPEAKING)[0].frame
    b = res.events(pb.Event.SPEAKING)[0].frame
    assert abs(a - b) <= 2 and len(res.of("audio")) > 0


def rss_mb() -> float:
    """本行程（伺服器在這裡的背景執行緒）的常駐記憶體（/proc/self/status 的 VmRSS）。"""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status 沒有 VmRSS")


@pytest.fixture(scope="module")
def lenient(assets, engine):
    """重取樣策略、有會話長度上限與短閒置計時的伺服器。"""
    cfg = make_cfg(assets, max_session_seconds=3.0, idle_timeout_s=1.0)
    with ServerThread(cfg, engine) as st:
        yield st


def test_tiny_sample_rate_refused_before_allocating(lenient, speech) -> None:
    # 12.8 KB 宣告為 1 Hz：以前重取樣到 16 kHz 要配置約 1 GB；現在在解碼前就拒絕。
    before = rss_mb()
    for rate in (1, 100, 7999):
        code, detail, _ = call(
            lenient.target, [start_msg(), audio_msg(b"\1\0" * 6400, 0, rate)], token=None
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, detail
        assert f"audio.sample_rate={rate}" in detail
    assert rss_mb() - before < 50
    assert wait_idle(lenient) == 0
    res = stream_audio(lenient.target, speech, fast=True, tail_seconds=1.5)
    assert res.status == grpc.StatusCode.OK and len(res.of("audio")) > 0, res.detail


def test_resampled_length_checked_before_resampling(lenient, speech) -> None:
    # 8 kHz 的 4 秒（64 000 位元組）重取樣後超過 max_session_seconds=3：解碼與重取樣前就拒絕。
    before = rss_mb()
    code, detail, _ = call(
        lenient.target, [start_msg(), audio_msg(b"\1\0" * 32000, 0, 8000)], token=None
    )
    assert code == grpc.StatusCode.OUT_OF_RANGE and "max_session_seconds" in detail
    assert rss_mb() - before < 50
    assert wait_idle(lenient) == 0
    res = stream_audio(lenient.target, speech, fast=True, tail_seconds=1.5)
    assert res.status == grpc.StatusCode.OK, res.detail


def test_empty_chunks_do_not_keep_session_alive(lenient, speech) -> None:
    def empties() -> Iterator[pb.ClientMessage]:
        yield start_msg()
        for i in range(20):  # 4 秒的空片段，idle_timeout_s=1
            yield audio_msg(b"", i)
            time.sleep(0.2)

    with grpc.insecure_channel(lenient.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.DuplexSpeechStub(ch).Converse(empties(), timeout=20))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle_timeout_s" in e.value.details()
    assert wait_idle(lenient) == 0
    res = stream_audio(lenient.target, speech, fast=True, tail_seconds=1.5)
    assert res.status == grpc.StatusCode.OK, res.detail


def test_duplicate_authorization_refused(strict, speech) -> None:
    good = ("authorization", f"Bearer {TOKEN}")
    for md in ([good, good], [("authorization", "Bearer wrong"), good]):
        with grpc.insecure_channel(strict.target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                list(pb_grpc.DuplexSpeechStub(ch).Converse(iter([start_msg()]), metadata=md))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in e.value.details()
    assert_alive(strict, speech)


def test_fast_sender_is_paced_to_real_time(lenient, speech) -> None:
    # 一次送完 2.5 秒音訊：伺服器記下的每幀到期時間是從第一則音訊抵達起的 40 ms 格點，每幀都不早於
    # 到期時間才算，而客戶端比到期時間早送到（積壓在自己的佇列裡）。只看伺服器記下的時間戳，
    # 不靠客戶端的牆鐘。
    res = stream_audio(lenient.target, speech, fast=True, tail_seconds=1.5)
    assert res.status == grpc.StatusCode.OK, res.detail
    assert wait_idle(lenient) == 0
    log = lenient.server.servicer.frame_log[-1]
    due, arrival, run = (np.array(log[k]) for k in ("due", "arrival", "run"))
    n = (len(speech) + 24000) // 640  # 完整的幀（最後不足一幀的樣本不算）
    assert len(due) == len(arrival) == len(run) == n
    assert due[0] == arrival[0]
    np.testing.assert_allclose(due - due[0], np.arange(n) * 0.04, atol=1e-9)
    assert np.all(run >= due)
    assert arrival[-1] < due[-1]
    assert len(res.of("audio")) > 0


class SlowModel:
    """故意變慢的模型：每次 `frame_step` 多睡 45 ms（其餘屬性轉給原模型）。"""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def frame_step(self, *args, **kw):
        time.sleep(0.045)
        return self._model.frame_step(*args, **kw)


@pytest.mark.parametrize("scheduler", ["batched", "per_session"])
def test_admission_refuses_session_that_would_break_real_time(assets, engine, scheduler) -> None:
    slow = dataclasses.replace(engine, model=SlowModel(engine.model))
    cfg = make_cfg(
        assets, compute_workers=1, admission_headroom=1.0, max_sessions=8, scheduler=scheduler
    )
    with ServerThread(cfg, slow) as st:
        h = HeldStream(st.target, chunks=6, token=None)
        deadline = time.time() + 20
        while st.server.servicer.measured_frames < 6 and time.time() < deadline:
            time.sleep(0.05)
        # 一個計算執行緒（批次排程的迴圈，或 compute_workers=1）、每幀平均 > 20 ms（串流編碼器的
        # 第一個區塊晚一幀，6 幀只跑了 4 步）：兩個會話就跟不上 40 ms 一幀。
        assert st.server.servicer.capacity() < 2
        code, detail, _ = call(st.target, [start_msg()], token=None)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, detail
        assert "admission_headroom" in detail
        code, rest = h.finish()
        assert code == grpc.StatusCode.OK and rest[-1].event.kind == pb.Event.SESSION_ENDED
    # 不開准入控制時同樣的情況照收（只看 max_sessions）。
    cfg = make_cfg(
        assets, compute_workers=1, admission_headroom=0.0, max_sessions=8, scheduler=scheduler
    )
    with ServerThread(cfg, slow) as st:
        h = HeldStream(st.target, chunks=6, token=None)
        while st.server.servicer.measured_frames < 6 and time.time() < deadline + 20:
            time.sleep(0.05)
        h2 = HeldStream(st.target, chunks=2, token=None)
        assert st.server.active_sessions == 2
        for x in (h, h2):
            code, rest = x.finish()
            assert code == grpc.StatusCode.OK


def test_shutdown_sends_session_ended_with_reason(assets, engine) -> None:
    cfg = make_cfg(assets, shutdown_grace_s=0.5)
    st = ServerThread(cfg, engine).__enter__()
    try:
        held = [HeldStream(st.target, chunks=5, token=None) for _ in range(2)]
        st.stop()  # 寬限 0.5 秒內客戶端都沒送 END
        for h in held:
            h.go.set()
            msgs = list(h.call)  # 串流正常結束，最後一則是帶原因的 SESSION_ENDED
            h.ch.close()
            assert msgs and msgs[-1].WhichOneof("payload") == "event"
            assert msgs[-1].event.kind == pb.Event.SESSION_ENDED
            assert "shutdown" in msgs[-1].event.detail
    finally:
        st.stop(0)


def test_graceful_shutdown_drains_sessions(assets, engine) -> None:
    # 寬限期遠長於測試需要的時間：機器忙時（例如兩個 pytest worker）會話照樣在寬限期內收尾。
    cfg = make_cfg(assets, shutdown_grace_s=60.0)
    st = ServerThread(cfg, engine).__enter__()
    try:
        h = HeldStream(st.target, chunks=5)
        stopper = threading.Thread(target=st.stop)
        stopper.start()
        time.sleep(0.3)
        # 關機中：新會話被拒絕，進行中的會話繼續。
        code, detail, _ = call(st.target, [start_msg()], token=None)
        assert code == grpc.StatusCode.UNAVAILABLE, detail
        assert stopper.is_alive()
        code, rest = h.finish()
        assert code == grpc.StatusCode.OK and rest[-1].event.kind == pb.Event.SESSION_ENDED
        stopper.join(60)
        assert not stopper.is_alive()
    finally:
        st.stop(0)
