"""打斷與附和：助理說話時使用者插話（≥ backchannel_max_seconds）→ 在反應視窗內停止助理音訊；
短的附和（< backchannel_max_seconds）→ 不停。以真實語音（espeak-ng）插入在助理說話期間的已知幀。

`policy="vad"` 讓輪替可重現（未訓練的小模型）：先跑一次得到助理開口的幀，再在同一前綴之後插入
使用者語音（前綴相同，VAD 與模型都是決定性的，所以助理在同一幀開口）。
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving.client import StreamResult, stream_audio
from export.serving.server import ServerThread
from export.serving.session import DuplexSession, SessionSettings
from speakllm_jax.audio.constants import FRAME_SAMPLES
from speakllm_jax.data.demo_corpus import synth
from tests.voila_reference import frame_rate_constant, full_decode

SR = 16000


@pytest.fixture(scope="module")
def server(assets, engine):
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    cfg.policy = "vad"
    # 這裡只看幀號上的性質：不必依即時節流（節流另有測試）。
    cfg.pace_realtime = False
    with ServerThread(cfg, engine) as st:
        yield st


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synth("請問明天早上的火車幾點出發，我想要買兩張票。", "cmn")


@pytest.fixture(scope="module")
def base(server, speech) -> tuple[np.ndarray, int]:
    """使用者一句話 + 靜音；回傳（波形, 助理開口的幀）。"""
    wave = np.concatenate([speech[: int(1.2 * SR)], np.zeros(4 * SR, np.float32)])
    res = stream_audio(server.target, wave, fast=True)
    assert res.status == grpc.StatusCode.OK, res.detail
    start = res.events(pb.Event.SPEAKING)[0].frame
    assert res.of("audio")[0].seq == start
    return wave, start


def insert(wave: np.ndarray, frame: int, piece: np.ndarray) -> np.ndarray:
    out = wave.copy()
    out[frame * FRAME_SAMPLES : frame * FRAME_SAMPLES + len(piece)] = piece
    return out


def audio_between(res: StreamResult, lo: int, hi: int) -> list[int]:
    return [a.seq for a in res.of("audio") if lo <= a.seq < hi]


def leaked_after(res: StreamResult, onset: int, stop: int) -> list[int]:
    """起點之後（幀號 > onset）、下一輪開口（stop）之前送到客戶端的助理音訊幀。"""
    return [a.seq for a in res.of("audio") if onset < a.seq < stop]


def test_barge_in_holds_audio_at_the_speaker(server, speech, base) -> None:
    wave, start = base
    onset = start + 10
    bc = round(server.server.cfg.backchannel_max_seconds / 0.04)
    res = stream_audio(server.target, insert(wave, onset, speech[SR : 2 * SR]), fast=True)
    assert res.status == grpc.StatusCode.OK, res.detail
    yields = res.events(pb.Event.YIELDED)
    assert len(yields) == 1
    y = yields[0]
    assert y.detail == "barge-in"
    assert onset <= y.user_onset_frame <= onset + 2
    # 使用者語音滿 backchannel_max_seconds 的那一幀判定為打斷。
    assert y.frame == y.user_onset_frame + bc - 1
    assert res.events(pb.Event.BACKCHANNEL) == []
    # 助理在插話前一直在說；起點之後到下一輪開口前，至多 2 幀助理音訊送到客戶端。
    assert audio_between(res, start, onset) == list(range(start, onset))
    later = [e.frame for e in res.events(pb.Event.SPEAKING) if e.frame > y.frame]
    assert later, "使用者說完後助理應再次開口"
    assert len(leaked_after(res, y.user_onset_frame, later[0])) <= 2
    # YIELDED 之後收到的音訊都屬於下一輪。
    idx = res.messages.index(next(m for m in res.messages if m.event == y))
    after = [m.audio.seq for m in res.messages[idx:] if m.WhichOneof("payload") == "audio"]
    assert all(s >= later[0] for s in after)
    turn = res.of("metrics")[0]
    # 反應 = 起點 → 音訊停住的幀（不是判定的幀）；送出的音訊只算真的送到的。
    assert turn.yielded and 0 <= turn.barge_in_reaction_frames <= 2
    assert turn.audio_frames == len(audio_between(res, start, later[0]))
    assert len(res.of("metrics")) == 2


@pytest.mark.parametrize("seconds", [0.3, 0.35])
def test_backchannel_resumes_the_same_turn(server, engine, speech, base, seconds) -> None:
    """backchannel_max_seconds=0.4 時 0.3／0.35 秒的「嗯」：停住後從停住處繼續，音訊一幀不少不重複。"""
    wave, start = base
    onset = start + 10
    short = speech[SR : SR + int(seconds * SR)]
    res = stream_audio(server.target, insert(wave, onset, short), fast=True)
    assert res.status == grpc.StatusCode.OK, res.detail
    assert res.events(pb.Event.YIELDED) == []
    bc = res.events(pb.Event.BACKCHANNEL)
    assert len(bc) == 1 and onset <= bc[0].user_onset_frame <= onset + 2
    # 沒有新的一輪：同一輪說滿 max_reply_seconds，幀號連續、沒有重複。
    assert len(res.events(pb.Event.SPEAKING)) == 1
    n = round(server.server.cfg.max_reply_seconds / 0.04)
    seqs = [a.seq for a in res.of("audio")]
    assert seqs == list(range(start, start + n))
    (turn,) = res.of("metrics")
    assert not turn.yielded and turn.audio_frames == n
    # 停住：附和判定之前，起點之後的音訊至多 2 幀送到客戶端，其餘在 BACKCHANNEL 之後才放出。
    idx = next(i for i, m in enumerate(res.messages) if m.event == bc[0])
    early = [m.audio.seq for m in res.messages[:idx] if m.WhichOneof("payload") == "audio"]
    assert len([s for s in early if s > bc[0].user_onset_frame]) <= 2
    assert bc[0].frame - bc[0].user_onset_frame > 2  # 真的停住過（附和判定在起點之後）
    # 波形接續：整輪收到的音訊（含停住後放出的）= 這一輪的語音碼一次整段解碼（逐幀串流的開頭：
    # 幀率卷積補零），至多差 PCM16 的 1 個量化階。語音碼取自同一輸入的單一會話（決定性）。
    local = DuplexSession(engine, SessionSettings.from_config(server.server.cfg))
    wave2 = insert(wave, onset, short)
    for i in range(len(wave2) // FRAME_SAMPLES):
        local.feed(wave2[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES], 0.0)
    local.finish()
    codes = np.stack(local.history[0].codes, axis=1)
    assert codes.shape[1] == n
    ref = full_decode(frame_rate_constant(engine.voila.model), codes)
    ref = (np.clip(ref, -1.0, 1.0) * 32767.0).astype(np.int32)
    got = np.concatenate([np.frombuffer(a.pcm16, "<i2") for a in res.of("audio")])
    assert got.shape == ref.shape
    assert np.abs(got.astype(np.int32) - ref).max() <= 1


def test_vad_first_audio_follows_end_of_speech(server, base) -> None:
    """vad 策略：使用者最後一個語音幀 → 第一個助理音訊幀 ≤ end_silence_ms + 2 幀。"""
    wave, start = base
    cfg = server.server.cfg
    frames = wave[: len(wave) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    last_speech = int(np.nonzero(np.abs(frames).max(axis=1) > 0)[0].max())
    delay = start - last_speech
    assert 0 < delay <= round(cfg.end_silence_ms / 40) + 2, delay


def test_explicit_interrupt(server, base) -> None:
    wave, start = base
    res = stream_audio(server.target, wave, fast=True, interrupt_at=start + 5)
    assert res.status == grpc.StatusCode.OK, res.detail
    y = res.events(pb.Event.YIELDED)
    assert len(y) == 1 and y[0].detail == "interrupt"
    assert audio_between(res, y[0].frame + 1, res.frames_sent) == []


def test_model_policy_audio_only_inside_turns(server, base) -> None:
    """`policy="model"`：輪替頭決定；不論說不說，助理音訊只出現在 SPEAKING 與該輪結束之間。"""
    wave, _ = base
    res = stream_audio(server.target, wave[: 3 * SR], fast=True, policy="model")
    assert res.status == grpc.StatusCode.OK, res.detail
    speaking = False
    n_audio = 0
    for m in res.messages:
        k = m.WhichOneof("payload")
        if k == "event" and m.event.kind == pb.Event.SPEAKING:
            speaking = True
        elif k == "metrics":
            assert m.metrics.audio_frames >= 0
            speaking = False
        elif k == "audio":
            assert speaking
            n_audio += 1
    made = sum(m.audio_frames for m in res.of("metrics"))
    # 被打斷的輪次裡還沒送出的音訊會被丟掉，所以收到的可能少於產生的。
    if res.events(pb.Event.YIELDED):
        assert n_audio <= made
    else:
        assert n_audio == made
