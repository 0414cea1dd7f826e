"""每輪量測：即時串流（依音訊時間送出）時的首包延遲、回應延遲幀數、即時率與音訊長度。"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving.client import stream_audio
from export.serving.server import ServerThread
from speakllm_jax.audio.constants import FRAME_SECONDS
from speakllm_jax.data.demo_corpus import synth


@pytest.fixture(scope="module")
def server(assets, engine):
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    cfg.max_reply_seconds = 1.0
    with ServerThread(cfg, engine) as st:
        yield st


def test_turn_metrics_realtime(server) -> None:
    speech = synth("你好，請幫我查一下天氣。", "cmn")[:16000]
    res = stream_audio(server.target, speech, fast=False, tail_seconds=1.6)
    assert res.status == grpc.StatusCode.OK, res.detail
    metrics = res.of("metrics")
    assert len(metrics) == 1
    m = metrics[0]
    audio = res.of("audio")
    # 量測與實際送出的音訊一致。
    assert m.audio_frames == len(audio) == 25  # max_reply_seconds=1.0
    assert m.audio_seconds == pytest.approx(m.audio_frames * FRAME_SECONDS)
    assert m.compute_seconds > 0 and m.rtf == pytest.approx(m.compute_seconds / m.audio_seconds)
    # 即時率：CPU 上的小模型遠快於即時；設上限只為抓住明顯的退化（例如每幀重算整段）。
    assert 0 < m.rtf < 1.0
    speaking = res.events(pb.Event.SPEAKING)[0]
    # vad 策略：靜音滿 end_silence 的觸發幀就開口（SPEAKING 的幀 = 觸發幀 = 第一個音訊幀）。
    assert m.response_delay_frames == audio[0].seq - speaking.frame == 0
    # 伺服器的觸發幀抵達 → 首包真的送出：要等區塊湊滿（即時送出，至多一個輸入幀），但不會太久。
    assert 0 < m.first_packet_latency_ms < 1000
    client = res.first_packet_latencies_ms()
    assert len(client) == 1 and 0 < client[0] < 1000
    assert not m.yielded and m.barge_in_reaction_frames == -1
    # 即時串流：牆鐘時間約等於音訊長度。
    summ = res.summary()
    assert 0.9 < summ["stream_rtf"] < 1.6
    assert summ["server_first_packet_latency_ms"] == [m.first_packet_latency_ms]
    assert np.isfinite(summ["server_rtf"]).all()
