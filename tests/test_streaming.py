"""全雙工服務端到端：真實 gRPC 伺服器（127.0.0.1、隨機埠）、真實語音（espeak-ng）、隨機小模型。

串流一句話後，依序收到：會話開始、聆聽、助理開始說話（在使用者說完之後）、助理音訊與文字
（幀號連續遞增）、每輪量測、會話結束。另測命令列的伺服器與客戶端，以及 16 個同時的會話。
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving.client import StreamResult, stream_audio
from export.serving.client import main as client_main
from export.serving.server import ServerThread
from speakllm_jax.audio.constants import FRAME_SAMPLES
from speakllm_jax.audio.vad import frame_flags
from speakllm_jax.data.demo_corpus import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(assets, engine):
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    with ServerThread(cfg, engine) as st:
        yield st


@pytest.fixture(scope="module")
def utterance() -> np.ndarray:
    return synth("今天天氣很好，我們去公園散步吧。", "cmn")[:19200]  # 1.2 秒


def check_order(res: StreamResult, speech_end_frame: int) -> None:
    """事件與音訊的順序：開始 → 聆聽 → (說話 → 音訊／文字 → 量測 → 聆聽)* → 結束。"""
    kinds = [m.WhichOneof("payload") for m in res.messages]
    assert res.messages[0].event.kind == pb.Event.SESSION_STARTED
    assert res.messages[1].event.kind == pb.Event.LISTENING
    assert kinds[-1] == "event" and res.messages[-1].event.kind == pb.Event.SESSION_ENDED
    speaking = False
    last_seq = -1
    turn_frames: list[int] = []
    for m, k in zip(res.messages, kinds, strict=True):
        if k == "event" and m.event.kind == pb.Event.SPEAKING:
            assert not speaking
            assert m.event.frame > speech_end_frame  # 助理不搶在使用者說完前開口
            speaking, turn_frames, first = True, [], m.event.frame
        elif k == "audio":
            assert speaking, "助理音訊必須在 SPEAKING 事件之後"
            a = m.audio
            assert a.sample_rate == 16000 and len(a.pcm16) == 2 * FRAME_SAMPLES
            assert a.seq > last_seq
            assert a.seq == (turn_frames[-1] + 1 if turn_frames else first)
            last_seq = a.seq
            turn_frames.append(a.seq)
        elif k == "text":
            assert speaking and m.text.frame == turn_frames[-1]
        elif k == "metrics":
            assert speaking and m.metrics.audio_frames == len(turn_frames)
            speaking = False
    assert not speaking


def test_streamed_utterance_gets_audio_and_text_in_order(server, utterance) -> None:
    res = stream_audio(server.target, utterance, fast=True, tail_seconds=2.5)
    assert res.status == grpc.StatusCode.OK, res.detail
    flags = frame_flags(utterance, 16000)  # 30 ms 一格
    speech_end = int(np.flatnonzero(flags)[-1] * 30 / 40)
    check_order(res, speech_end)
    audio = res.of("audio")
    assert len(audio) >= 20 and len(res.of("metrics")) == 1
    assert len(res.of("text")) >= 1
    reply = res.reply_wave()
    assert len(reply) == res.frames_sent * FRAME_SAMPLES
    start = audio[0].seq * FRAME_SAMPLES
    assert np.abs(reply[:start]).max() == 0.0 and np.abs(reply[start:]).max() > 1e-4


def test_cli_server_and_client(assets, utterance, tmp_path: Path, capsys) -> None:
    wav = tmp_path / "in.wav"
    sf.write(wav, utterance, 16000)
    cmd = [sys.executable, "-m", "export.serving.server", "--config", "serving"]
    cmd += [f"--config.model_dir={assets[0]}", f"--config.voila_dir={assets[1]}"]
    cmd += ["--config.port=0", "--config.shutdown_grace_s=5"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line, before = "", []
        deadline = time.time() + 120
        while "listening on" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "伺服器提早結束"
            before.append(line)
        target = line.split("listening on")[1].strip()
        # 開始監聽前已以 max_sessions（預設 32）個會話暖機，常駐快取長到 32 列。
        assert any(x.startswith("warm-up: 32 sessions, 32 cache rows") for x in before), before
        out = tmp_path / "reply.wav"
        rc = client_main(
            ["stream", "--audio", str(wav), "--out", str(out), "--fast", "--target", target]
        )
        printed = capsys.readouterr().out
        assert rc == 0, printed
        for key in ("first-packet latency", "barge-in reaction", "real-time factor"):
            assert key in printed
        reply, sr = sf.read(out, dtype="float32")
        assert sr == 16000 and len(reply) >= len(utterance) and np.abs(reply).max() > 1e-4
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "stopped" in rest


def test_sixteen_concurrent_sessions(server, utterance) -> None:
    results: list[StreamResult | None] = [None] * 16

    def run(i: int) -> None:
        results[i] = stream_audio(server.target, utterance[:16000], fast=True, tail_seconds=1.5)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.status == grpc.StatusCode.OK for r in results)
    # 同樣的輸入、決定性的模型：每個會話得到同樣的回覆（同樣的封包序號；批次排程把不同會話的
    # 同長視窗一起解碼，浮點差 ≤ 1e-5，轉成 PCM16 時至多差 1 個量化階）。
    ref = results[0].reply_wave()
    seqs = [a.seq for a in results[0].of("audio")]
    assert seqs
    for r in results[1:]:
        assert [a.seq for a in r.of("audio")] == seqs
        assert np.abs(r.reply_wave() - ref).max() <= 1.0 / 32767.0 + 1e-7
    assert server.server.active_sessions == 0
