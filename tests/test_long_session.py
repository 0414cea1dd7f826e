"""長對話經真實伺服器（127.0.0.1、隨機埠）：超過 30 秒的會話在 `max_session_seconds=0` 下完成。

會話的模型路徑是孿生的 `Streamer`（有界的編碼器左方脈絡、LLM 注意力槽加滑動視窗），所以
50 秒的對話每一幀都被回應、每次使用者說完助理都開口，而結束時的串流狀態大小與 10 秒時相同。
`pace_realtime=False` 讓它比即時快，幀的語意不變。匯出的模型把 LLM 視窗設成 200 幀（8 秒），
10 秒時就已滿。
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from configs.serving import get_config
from export.demo_assets import build_demo_assets
from export.serving import duplex_pb2 as pb
from export.serving.client import stream_audio
from export.serving.server import ServerThread
from export.serving.session import load_engine
from speakllm_jax.audio.constants import FRAME_SAMPLES
from speakllm_jax.data.demo_corpus import synth

SR = 16000
SINKS, WINDOW = 4, 200
PERIOD = 125  # 每 5 秒一次使用者發言（1.2 秒語音 + 靜音），助理回 3 秒


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """示範模型的副本，長對話方案改成 LLM 視窗 200 幀（注意力槽 4 幀）。"""
    model_dir, voila_dir = build_demo_assets(tmp_path_factory.getbasetemp() / "serving_assets")
    copy = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(model_dir, copy)
    path = copy / "heads_config.json"
    heads = json.loads(path.read_text(encoding="utf-8"))
    assert heads["encoder_left_chunks"] > 0
    heads.update(llm_sink_frames=SINKS, llm_window_frames=WINDOW)
    path.write_text(json.dumps(heads), encoding="utf-8")
    return copy, voila_dir


@pytest.fixture(scope="module")
def server(assets):
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    cfg.policy = "vad"
    cfg.pace_realtime = False
    cfg.max_session_seconds = 0.0
    with ServerThread(cfg, load_engine(*assets)) as st:
        # 記下伺服器建立的會話，結束後讀它的幀數與串流狀態大小。
        servicer = st.server.servicer
        make = servicer._new_session
        st.sessions = []

        def record(options):
            session = make(options)
            st.sessions.append(session)
            return session

        servicer._new_session = record
        yield st


@pytest.fixture(scope="module")
def utterance() -> np.ndarray:
    return synth("今天天氣很好，我們去公園散步吧。", "cmn")[: int(1.2 * SR)]


def conversation(utterance: np.ndarray, turns: int) -> np.ndarray:
    block = np.zeros(PERIOD * FRAME_SAMPLES, np.float32)
    block[: len(utterance)] = utterance
    return np.tile(block, turns)


def run(server, wave: np.ndarray):
    res = stream_audio(server.target, wave, fast=True, timeout=300.0)
    assert res.status == grpc.StatusCode.OK, res.detail
    return res, server.sessions[-1]


def test_fifty_second_session_is_answered_with_bounded_state(server, utterance) -> None:
    short, s10 = run(server, conversation(utterance, 2))  # 10 秒
    turns = 10
    res, s50 = run(server, conversation(utterance, turns))  # 50 秒
    frames = turns * PERIOD
    # 每一幀都收到、都跑過模型（LLM 位置 = 幀數），會話正常結束在最後一幀。
    assert res.frames_sent == frames
    assert s50.frame == s50.model_frame == s50.streamer.position == frames
    (ended,) = res.events(pb.Event.SESSION_ENDED)
    assert ended.frame == frames
    # 每次使用者說完助理都開口（在這一段內、語音之後），說滿 max_reply_seconds，不被打斷。
    reply = round(server.server.cfg.max_reply_seconds / 0.04)
    speech_frames = -(-len(utterance) // FRAME_SAMPLES)
    starts = [e.frame for e in res.events(pb.Event.SPEAKING)]
    assert len(starts) == turns
    for k, start in enumerate(starts):
        assert k * PERIOD + speech_frames <= start < (k + 1) * PERIOD - reply
    seqs = [a.seq for a in res.of("audio")]
    assert seqs == [s + i for s in starts for i in range(reply)]
    metrics = res.of("metrics")
    assert len(metrics) == turns and not any(m.yielded for m in metrics)
    assert res.events(pb.Event.YIELDED) == [] and res.events(pb.Event.ERROR) == []
    # 前兩輪與 10 秒的會話逐幀相同（同一前綴，決定性）。
    assert starts[:2] == [e.frame for e in short.events(pb.Event.SPEAKING)]
    # 串流狀態有上限：50 秒結束時與 10 秒結束時一樣大，LLM 快取是注意力槽加視窗。
    sizes = s50.cache_sizes()
    assert sizes == s10.cache_sizes()
    assert sizes["llm"] == SINKS + WINDOW - 1 < 2 * PERIOD


def test_step_batch_equals_separate_steps(assets) -> None:
    """不同時間開始的會話（位置 0、37、230，最後一個已超過 LLM 視窗）一次批次前進，與逐一前進相同。"""
    from export.torch_model import load_exported
    from tests.stream_batch_check import advanced_streamers, assert_batch_steps_equal, prev_rows

    model = load_exported(assets[0])
    prev_row = prev_rows(model, model.cfg.num_codebooks, codebook_size=2048)
    separate, batched = advanced_streamers(model, (0, 37, 230), prev_row)
    assert separate[2].cache_sizes()["llm"] == SINKS + WINDOW - 1
    assert_batch_steps_equal(model, separate, batched, prev_row)


def test_resident_cache_is_one_under_concurrent_sessions(assets) -> None:
    """伺服器在多個執行緒同時建立會話：32 個執行緒同時建 `Streamer`，都借到同一個常駐快取的列
    （以前各執行緒可能各建一個，批次前進因此退回逐會話），之後一批前進。"""
    import threading

    import torch

    from export.torch_model import Streamer, load_exported, step_batch
    from tests.stream_batch_check import prev_rows

    model = load_exported(assets[0])
    n = 32
    barrier = threading.Barrier(n)
    made: list[Streamer] = []

    def make() -> None:
        barrier.wait()
        made.append(Streamer(model, 2))

    threads = [threading.Thread(target=make) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == n
    assert {id(st.cache.pool) for st in made} == {id(model.slot_cache())}
    assert len({st.cache.slot for st in made}) == n
    prev_row = prev_rows(model, model.cfg.num_codebooks, codebook_size=2048)
    g = torch.Generator().manual_seed(0)
    prevs = [prev_row(r, g) for r in range(n)]
    prev = {key: torch.cat([p[key] for p in prevs]) for key in prevs[0]}
    out = step_batch(made, torch.zeros((n, 1, model.cfg.llm_hidden)), prev)
    assert out["code_ids"].shape == (n, 1, model.cfg.num_codebooks)


def test_step_batch_refuses_rows_of_another_cache(assets) -> None:
    """`to()` 之後模型的常駐快取重建：之前建的 `Streamer` 與新的不能一批前進（一行錯誤，不靜默算錯）；
    重建後的 `Streamer` 照常一批前進。"""
    import torch

    from export.torch_model import Streamer, load_exported, step_batch
    from tests.stream_batch_check import prev_rows

    model = load_exported(assets[0])
    prev_row = prev_rows(model, model.cfg.num_codebooks, codebook_size=2048)
    g = torch.Generator().manual_seed(0)
    old = Streamer(model, 2)
    model.to(torch.float32)
    new = [Streamer(model, 2) for _ in range(2)]
    user = torch.zeros((2, 1, model.cfg.llm_hidden))
    prevs = [prev_row(r, g) for r in range(2)]
    prev = {key: torch.cat([p[key] for p in prevs]) for key in prevs[0]}
    with pytest.raises(ValueError, match="同一個常駐批次快取"):
        step_batch([old, new[0]], user, prev)
    assert old.position == new[0].position == 0
    out = step_batch(new, user, prev)
    assert out["code_ids"].shape == (2, 1, model.cfg.num_codebooks)
    assert [st.position for st in new] == [1, 1]


def test_resident_cache_rows_leave_and_join(assets) -> None:
    """常駐批次快取（`SlotCache`）的列：六個串流超過起始的四列時列數加倍；會話結束（`Streamer`
    被回收）時那一列歸還，新會話借到它時從空的開始（舊的 230 幀鍵值被遮掉、不會被看到）；之後
    有列離開、有列加入的批次前進仍與逐一前進相同（含已超過視窗、環狀覆寫的列）。"""
    import gc

    from export.torch_model import load_exported
    from tests.stream_batch_check import advanced_streamers, assert_batch_steps_equal, prev_rows

    model = load_exported(assets[0])
    pool = model.slot_cache()
    prev_row = prev_rows(model, model.cfg.num_codebooks, codebook_size=2048)
    separate, batched = advanced_streamers(model, (5, 230, 12), prev_row)
    assert pool.rows >= 6 and len({st.cache.slot for st in separate + batched}) == 6
    leaving = batched.pop(1)
    separate.pop(1)
    slot = leaving.cache.slot
    del leaving
    gc.collect()
    assert slot in pool.free_slots()
    sep_new, bat_new = advanced_streamers(model, (3,), prev_row)
    assert slot in {sep_new[0].cache.slot, bat_new[0].cache.slot}
    assert sep_new[0].cache_sizes()["llm"] == bat_new[0].cache_sizes()["llm"] == 3
    assert_batch_steps_equal(model, separate + sep_new, batched + bat_new, prev_row, steps=4)


def test_slot_cache_without_window_grows_and_steps_subsets(assets) -> None:
    """沒有視窗的舊匯出：常駐快取的容量不夠就加倍、列不夠也加倍；每步只前進一部分的列（長度
    各不相同）時，每列的隱狀態與各自用 transformers `DynamicCache` 逐步前進相同。"""
    import torch
    from transformers import DynamicCache

    from export.torch_model import SlotCache, load_exported

    model = load_exported(assets[0])
    cfg, d = model.llm.config, model.cfg.llm_hidden
    pool = SlotCache(cfg, None, model.device, model.dtype, rows=1, length=4)
    refs = [pool.acquire() for _ in range(3)]
    caches = [DynamicCache(config=cfg) for _ in refs]
    steps = [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for t in range(10):
            rows = [0, 1, 2] if t % 3 else [0, 2]
            x = 0.1 * torch.randn((len(rows), 1, d), generator=g)
            pos = torch.tensor([[steps[r]] for r in rows])
            got = pool.step(model.llm.model, x, pos, [refs[r].slot for r in rows])
            for i, r in enumerate(rows):
                bias = torch.zeros((1, 1, 1, steps[r] + 1))
                ref = model.llm.model(
                    inputs_embeds=x[i : i + 1],
                    attention_mask=bias,
                    position_ids=pos[i : i + 1],
                    cache=caches[r],
                    use_cache=True,
                ).last_hidden_state
                torch.testing.assert_close(got[i : i + 1], ref, atol=1e-5, rtol=0)
                steps[r] += 1
    assert pool.rows == 4 and pool.cap == 16
    assert [r.get_seq_length() for r in refs] == steps == [10, 6, 10]
