"""CosyVoice2 語音頭的全雙工服務：真實 gRPC 伺服器（127.0.0.1、隨機埠）、真實語音（espeak-ng）、
隨機 tiny 模型（`speech_head="cosyvoice2"` 匯出）與隨機 tiny token2wav（`save_random_token2wav`）。

- 串流一句話：助理音訊是 24 kHz、每包 40 ms（960 樣本），`seq` 從助理開口的幀起連續，
  封包數等於這一輪的語音碼數；會話開始事件報出語音頭與輸出取樣率。
- 增量解碼：直接驅動會話，封包隨輸入幀逐步送出（不是輪次結束才一次送），第一包在湊滿
  token2wav 的 `hop + pre_lookahead_len` 個語音碼時才出現；所有封包接起來與同一串語音碼
  以 `Token2Wav.stream` 解出的波形在 PCM16 上相同。
- 打斷：助理說話（已有音訊送出）時使用者插話 → `YIELDED`，之後到下一輪之前沒有任何助理音訊，
  被打斷的那一輪送出的封包少於它產生的語音碼。
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from configs.serving import get_config
from export.demo_assets import build_demo_assets
from export.serving import duplex_pb2 as pb
from export.serving.server import ServerThread
from export.serving.session import DuplexSession, SessionSettings, load_engine
from speakllm_jax.data.demo_corpus import synth

SR = 16000
OUT_SR = 24000
OUT_FRAME = 960  # 24 kHz 的 40 ms
IN_FRAME = 640


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory):
    return build_demo_assets(
        tmp_path_factory.getbasetemp() / "serving_assets_cosyvoice2", speech_head="cosyvoice2"
    )


@pytest.fixture(scope="module")
def engine(assets):
    model_dir, t2w_dir = assets
    return load_engine(model_dir, token2wav_dir=t2w_dir)


@pytest.fixture(scope="module")
def server(assets, engine):
    cfg = get_config()
    cfg.model_dir = str(assets[0])
    cfg.token2wav_dir = str(assets[1])
    cfg.port = 0
    cfg.policy = "vad"
    with ServerThread(cfg, engine) as st:
        yield st


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synth("請問明天早上的火車幾點出發，我想要買兩張票。", "cmn")


@pytest.fixture(scope="module")
def base_wave(speech) -> np.ndarray:
    return np.concatenate([speech[: int(1.2 * SR)], np.zeros(4 * SR, np.float32)])


def test_engine_reports_head_and_rate(engine) -> None:
    assert engine.speech_head == "cosyvoice2"
    assert engine.output_rate == OUT_SR and engine.output_frame_samples == OUT_FRAME
    assert engine.voila is None and engine.token2wav is not None


def test_streamed_dialogue_gets_24khz_audio(server, base_wave) -> None:
    from export.serving.client import stream_audio

    res = stream_audio(server.target, base_wave, fast=True)
    assert res.status == grpc.StatusCode.OK, res.detail
    started = res.events(pb.Event.SESSION_STARTED)[0]
    assert "speech_head=cosyvoice2" in started.detail
    assert f"output_sample_rate={OUT_SR}" in started.detail
    speaking = res.events(pb.Event.SPEAKING)
    metrics = res.of("metrics")
    assert len(speaking) == 1 and len(metrics) == 1
    audio = res.of("audio")
    assert all(a.sample_rate == OUT_SR and len(a.pcm16) == 2 * OUT_FRAME for a in audio)
    seqs = [a.seq for a in audio]
    start = speaking[0].frame
    # 每個語音碼兩格 mel、每格 480 點 = 一個 40 ms 封包；輪次結束時剩下的全部解完送出。
    assert seqs == list(range(start, start + metrics[0].audio_frames))
    assert metrics[0].audio_frames == round(server.server.cfg.max_reply_seconds / 0.04)
    # vad 策略在觸發幀就開口：第一個封包的 seq 是觸發幀（要等湊滿語音碼才送出）。
    assert metrics[0].first_packet_latency_ms > 0 and metrics[0].response_delay_frames == 0
    # 事件順序：音訊在 SPEAKING 之後、該輪的量測之前。
    kinds = [m.WhichOneof("payload") for m in res.messages]
    first_audio = kinds.index("audio")
    assert res.messages.index(next(m for m in res.messages if m.event == speaking[0])) < first_audio
    assert max(i for i, k in enumerate(kinds) if k == "audio") < kinds.index("metrics")
    reply = res.reply_wave()
    assert res.output_rate == OUT_SR and len(reply) == res.frames_sent * OUT_FRAME
    assert np.abs(reply[: start * OUT_FRAME]).max() == 0.0
    assert np.abs(reply[start * OUT_FRAME :]).max() > 1e-4


def test_incremental_decode_matches_token2wav_stream(engine, base_wave) -> None:
    """直接驅動會話：封包隨幀逐步送出，接起來與同一串語音碼的 `Token2Wav.stream` 相同。"""
    session = DuplexSession(engine, SessionSettings(policy="vad"))
    emitted: list[tuple[int, int, bytes]] = []  # （送進的輸入幀, seq, pcm）
    for i in range(0, len(base_wave), IN_FRAME):
        for m in session.feed(base_wave[i : i + IN_FRAME]):
            if m.WhichOneof("payload") == "audio":
                emitted.append((i // IN_FRAME, m.audio.seq, m.audio.pcm16))
    for m in session.finish():
        if m.WhichOneof("payload") == "audio":
            emitted.append((len(base_wave) // IN_FRAME, m.audio.seq, m.audio.pcm16))
    (turn,) = session.history
    tokens = [int(c[0]) for c in turn.codes]
    assert len(tokens) == turn.frames == len(emitted)
    assert len(set(tokens)) > 1  # 真的是模型逐幀產生的語音碼
    # 第一包在湊滿 hop + 預看個語音碼時才出現（不是第一個語音碼就有），之後分多次送出。
    t2w = engine.token2wav
    need = t2w.token_hop_len + t2w.flow.config.pre_lookahead_len
    first_input_frame = emitted[0][0]
    start = turn.audio_start
    assert first_input_frame >= start + need - 1
    assert len({f for f, _, _ in emitted}) >= 3
    got = np.frombuffer(b"".join(p for _, _, p in emitted), dtype="<i2")
    ref = np.concatenate(list(t2w.stream([tokens])))
    ref = (np.clip(ref, -1.0, 1.0) * 32767.0).astype("<i2")
    assert got.shape == ref.shape
    assert np.abs(got.astype(np.int32) - ref.astype(np.int32)).max() <= 1


def test_barge_in_stops_cosyvoice2_output(server, speech, base_wave) -> None:
    from export.serving.client import stream_audio

    first = stream_audio(server.target, base_wave, fast=True)
    start = first.events(pb.Event.SPEAKING)[0].frame
    onset = start + 30  # 第一包（約 13 個語音碼）之後才插話，打斷時已有音訊在送
    wave = base_wave.copy()
    piece = speech[SR : 2 * SR]
    wave[onset * IN_FRAME : onset * IN_FRAME + len(piece)] = piece
    res = stream_audio(server.target, wave, fast=True)
    assert res.status == grpc.StatusCode.OK, res.detail
    yields = res.events(pb.Event.YIELDED)
    assert len(yields) == 1 and yields[0].detail == "barge-in"
    y = yields[0]
    assert onset <= y.user_onset_frame <= onset + 2
    assert 0 <= y.frame - onset <= int(server.server.cfg.reaction_window_frames)
    idx = next(i for i, m in enumerate(res.messages) if m.event == y)
    before = [m.audio.seq for m in res.messages[:idx] if m.WhichOneof("payload") == "audio"]
    assert before and before == list(range(start, start + len(before)))
    assert before[-1] < y.frame
    later = [e.frame for e in res.events(pb.Event.SPEAKING) if e.frame > y.frame]
    stop = later[0] if later else res.frames_sent
    after = [m.audio.seq for m in res.messages[idx:] if m.WhichOneof("payload") == "audio"]
    assert all(s >= stop for s in after)  # 打斷後到下一輪開口前沒有任何助理音訊
    turn = res.of("metrics")[0]
    # 反應 = 起點 → 停住（hold）的幀；停住後產生的封包與還沒解碼的語音碼都丟掉，量測只算送出的。
    assert turn.yielded and 0 <= turn.barge_in_reaction_frames <= 2
    assert turn.audio_frames == len(before)
    assert all(s <= y.user_onset_frame + 2 for s in before)


def test_client_cli_writes_24khz_reply(server, base_wave, tmp_path, capsys) -> None:
    import soundfile as sf

    from export.serving.client import main as client_main

    wav = tmp_path / "in.wav"
    sf.write(wav, base_wave[: int(1.6 * SR)], SR)
    out = tmp_path / "reply.wav"
    rc = client_main(
        ["stream", "--audio", str(wav), "--out", str(out), "--fast", "--target", server.target]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"({OUT_SR} Hz)" in printed
    reply, sr = sf.read(out, dtype="float32")
    assert sr == OUT_SR and np.abs(reply).max() > 1e-4
    # 與輸入同一時間軸：長度 = 送出的幀數（含補的靜音）× 960，24 kHz 下的秒數與輸入相同。
    assert len(reply) % OUT_FRAME == 0 and len(reply) / OUT_SR >= 1.6 + 2.0 - 0.04


def test_step_batch_cosyvoice2_equals_separate_steps(assets) -> None:
    """cosyvoice2：不同時間開始的串流（思考者與 talker 快取長度各不相同）一次批次前進，
    與逐一前進的 logits（≤ 1e-4）、語音碼、快取大小相同。"""
    from export.torch_model import load_exported
    from tests.stream_batch_check import advanced_streamers, assert_batch_steps_equal, prev_rows

    model = load_exported(assets[0])
    prev_row = prev_rows(model, codebooks=1, codebook_size=6561)
    separate, batched = advanced_streamers(model, (0, 5, 23), prev_row)
    assert_batch_steps_equal(model, separate, batched, prev_row)
