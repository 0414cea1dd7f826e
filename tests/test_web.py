"""瀏覽器對話頁（`export.serving.web`）：真實的 headless Chromium 經 WebSocket 橋接與 gRPC 伺服器對話。

Chromium 以假的媒體裝置把一個 WAV 當麥克風（espeak-ng 提問 → 靜音 → 助理說話時插話），Selenium 操作
頁面，斷言都來自頁面自己的狀態（`window.speakllm`，AudioContext 時鐘）。`policy="vad"` 讓輪替可重現。
另有不開瀏覽器的橋接測試：同一段音訊經 WebSocket 與直接經 gRPC 得到相同的事件與音訊，錯誤狀態對應
到關閉碼 4000 + 狀態碼且說明文字相同。
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving.client import stream_audio
from export.serving.web import AUDIO_HEADER, WebThread, close_code
from speakllm_jax.audio.constants import FRAME_SAMPLES
from speakllm_jax.data.demo_corpus import synth

SR = 16000
FRAME_S = FRAME_SAMPLES / SR
TOKEN = "web-secret"
IDLE_S = 2.0  # 測試用的短閒置逾時（預設 10 秒）
QUANTUM_S = 128 / SR  # Web Audio 的渲染量子：播放端量測的時間解析度
REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "test-output" / "web"

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="需要 Debian 的 chromium 與 chromium-driver（bash launch/setup.sh 以 apt 安裝）",
)


def _cfg(assets: tuple[Path, Path]) -> Any:
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    cfg.web_port = 0
    cfg.policy = "vad"
    cfg.auth_token = TOKEN
    cfg.idle_timeout_s = IDLE_S
    return cfg


@pytest.fixture(scope="module")
def web(assets, engine):
    with WebThread(_cfg(assets), engine) as wt:
        yield wt


def _chrome(wav: Path | None) -> Any:
    """headless Chromium：`wav` 當假麥克風（自動允許）；None 時有假麥克風但權限提示一律拒絕。"""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",
    ]
    if wav is None:
        args.append("--deny-permission-prompts")
    else:
        # `%noloop`：檔案只播一次（Chromium 預設會循環播放假麥克風的檔案）。
        args += [
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop",
        ]
    for arg in args:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def _write_wav(path: Path, wave: np.ndarray) -> Path:
    sf.write(path, wave.astype(np.float32), SR, subtype="PCM_16")
    return path


def _state(driver: Any) -> dict[str, Any]:
    return driver.execute_script("return window.speakllm")


def _wait(driver: Any, script: str, timeout: float) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script}")
    )


def _open(driver: Any, url: str) -> None:
    driver.get(url)
    _wait(driver, "window.speakllm.config !== null", 20)


def _overlap(spans: list[list[float]], lo: float, hi: float, end: float) -> float:
    """有聲區間（結束為 None 表示到 end 仍在發聲）與 [lo, hi) 重疊的總秒數。"""
    total = 0.0
    for a, b in spans:
        b = end if b is None else b
        total += max(0.0, min(b, hi) - max(a, lo))
    return total


def _severe_logs(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, np.ndarray]:
    return synth("火車幾點出發", "cmn"), synth("等一下我還有問題", "cmn")


@needs_browser
def test_barge_in_flushes_playback_in_browser(web, speech, tmp_path) -> None:
    question, barge = speech
    z = lambda s: np.zeros(int(s * SR), np.float32)  # noqa: E731
    # 提問 → 1.2 秒靜音（320 ms 後助理開口，最多說 3 秒）→ 0.3 秒的「嗯」（附和：停住後繼續）
    # → 1 秒靜音 → 插話 1.2 秒（打斷）→ 靜音（助理再開口）。
    hum = question[SR : SR + int(0.3 * SR)]
    wave = np.concatenate([z(0.6), question, z(1.2), hum, z(1.0), barge[: int(1.2 * SR)], z(3.0)])
    driver = _chrome(_write_wav(tmp_path / "mic.wav", wave))
    try:
        # 抖動緩衝加深到 0.3 秒（lead）：按「打斷」時佇列裡一定還有排好的音訊，即使負載下伺服器
        # 只勉強即時、音訊逐幀剛好趕上（預設 0.1 秒時來回一趟就可能播完）。
        _open(driver, f"{web.url}?token={TOKEN}&aec=0&lead=0.3")
        driver.find_element("id", "start").click()
        _wait(driver, "window.speakllm.sessionStarted", 20)
        _wait(driver, "window.speakllm.events.some(e => e.kind === 'YIELDED')", 30)
        # 插話之後助理再開口；播放中按「打斷」（Control INTERRUPT）：這時佇列裡一定有排好的音訊。
        _wait(
            driver,
            "(() => { const s = window.speakllm; const y = s.events.find(e => e.kind === 'YIELDED');"
            " return s.chunks.some(c => c.turn > y.turn); })()",
            20,
        )
        # 另要求按下時這一輪還沒結束（頁面還沒收到它的量測）：已說完的輪次，INTERRUPT 不送 YIELDED。
        _wait(
            driver,
            "(() => { const s = window.speakllm; const t = Math.max(...s.chunks.map(c => c.turn));"
            " return window.speakllmQueued() > 0.2 && !(s.turns[t] && s.turns[t].metrics); })()",
            10,
        )
        driver.find_element("id", "interrupt").click()
        _wait(driver, "window.speakllm.events.filter(e => e.kind === 'YIELDED').length === 2", 20)
        time.sleep(0.3)
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        shot = OUTPUT_DIR / "barge_in.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        driver.find_element("id", "stop").click()
        _wait(driver, "window.speakllm.close !== null", 20)
        s = _state(driver)
        logs = _severe_logs(driver)
    finally:
        driver.quit()
    (OUTPUT_DIR / "barge_in_state.json").write_text(json.dumps(s, ensure_ascii=False, indent=1))

    assert s["sessionStarted"] and s["started"]
    assert s["close"]["code"] == 1000, s["close"]
    assert s["sampleRate"] == SR
    yields = [e for e in s["events"] if e["kind"] == "YIELDED"]
    assert [e["detail"] for e in yields] == ["barge-in", "interrupt"], yields
    end = s["close"]["at"]

    # 附和：伺服器停住後依序放出，頁面從停住處接著播，seq 一幀不少不重複。
    (bc,) = [e for e in s["events"] if e["kind"] == "BACKCHANNEL"]
    assert bc["turn"] == yields[0]["turn"] and bc["frame"] < yields[0]["frame"]
    seqs = [c["seq"] for c in s["chunks"] if c["turn"] == bc["turn"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[0] < bc["user_onset_frame"] < seqs[-1]

    # 插話：伺服器在使用者起點停住音訊、判定打斷後送 YIELDED，頁面清空這一輪的播放佇列。
    y = yields[0]
    onset, turn = y["user_onset_frame"], y["turn"]
    ours = [c for c in s["chunks"] if c["turn"] == turn]
    assert ours, "助理音訊應已排進播放"
    assert not s["seqProblems"], s["seqProblems"]
    flush = _flush_of(s, turn)
    assert flush["at"] - flush["receivedAt"] <= FRAME_S
    for c in ours:
        # 還沒開始播的片段在開始之前就停了（stoppedAt == start，播出 0 秒）。
        stop = c["stoppedAt"] if c["stoppedAt"] is not None else c["end"]
        assert stop <= flush["at"] + 1e-6 or stop == c["start"], c
    # 使用者起點放在播放時鐘上：第 onset 幀的助理音訊原本要播的時間（同一時間軸，每幀 40 ms）。
    before = [c for c in ours if c["seq"] <= onset]
    assert before, "插話應落在助理說話期間"
    ref = max(before, key=lambda c: c["seq"])
    onset_play = ref["start"] + (onset - ref["seq"]) * FRAME_S
    next_turn = min(c["start"] for c in s["chunks"] if c["turn"] > turn)
    played = _overlap(s["audible"], onset_play, next_turn, end)
    onset_mic = s["frameTimes"][onset]
    played_mic = _overlap(s["audible"], onset_mic, next_turn, end)
    assert _overlap(s["audible"], ours[0]["start"], onset_play, end) > 0.2, "插話前助理應在說話"
    # 量測以渲染量子（8 ms）為單位：容許一個量子的量化誤差。
    assert played <= 2 * FRAME_S + QUANTUM_S, played
    assert _overlap(s["audible"], flush["at"] + FRAME_S, next_turn, end) <= QUANTUM_S

    # 打斷：佇列裡還有排好的音訊，清空後一幀之內就沒有聲音。
    y2 = yields[1]
    flush2 = _flush_of(s, y2["turn"])
    assert flush2["cutSeconds"] > 0, flush2
    later = [c["start"] for c in s["chunks"] if c["turn"] > y2["turn"]]
    silent_from = flush2["at"] + FRAME_S
    assert _overlap(s["audible"], silent_from, min(later, default=end), end) <= QUANTUM_S

    print(
        f"插話起點後播出的助理音訊：播放時鐘 {played * 1000:.0f} ms、麥克風時鐘 "
        f"{played_mic * 1000:.0f} ms（YIELDED 在麥克風起點後 {(y['at'] - onset_mic) * 1000:.0f} ms "
        f"收到）；打斷時清掉 {flush2['cutSeconds'] * 1000:.0f} ms 排好的音訊；首輪頁面延遲 "
        f"{s['turns']['0']['latencyMs']:.0f} ms；重新起播 {len(s['rebuffers'])} 次"
    )
    assert s["consoleErrors"] == [] and logs == [], (s["consoleErrors"], logs)


def _flush_of(s: dict[str, Any], turn: int) -> dict[str, Any]:
    (flush,) = [f for f in s["flushes"] if f["reason"] == "yielded" and f["turn"] == turn]
    return flush


@pytest.fixture(scope="module")
def quiet_browser(tmp_path_factory: pytest.TempPathFactory):
    """錯誤訊息的測試共用的瀏覽器：麥克風是一段低聲的雜訊（內容不重要）。"""
    rng = np.random.default_rng(0)
    wav = _write_wav(
        tmp_path_factory.mktemp("quiet") / "mic.wav", 1e-3 * rng.standard_normal(20 * SR)
    )
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "需要 Debian 的 chromium 與 chromium-driver（bash launch/setup.sh 以 apt 安裝）"
        )
    driver = _chrome(wav)
    yield driver
    driver.quit()


def _message(driver: Any, kind: str, timeout: float) -> dict[str, Any]:
    _wait(driver, f"window.speakllm.messages.some(m => m.kind === '{kind}')", timeout)
    el = driver.find_element("id", "message")
    assert el.is_displayed()
    msg = [m for m in _state(driver)["messages"] if m["kind"] == kind][-1]
    assert el.text == msg["text"]
    return msg


@needs_browser
def test_page_shows_rejected_token_and_idle_timeout(web, quiet_browser) -> None:
    d = quiet_browser
    grpc_detail = stream_audio(web.server.target, np.zeros(SR, np.float32), token="wrong").detail
    _open(d, f"{web.url}?token=wrong&aec=0")
    d.find_element("id", "start").click()
    msg = _message(d, "token", 20)
    s = _state(d)
    assert s["close"]["code"] == close_code(grpc.StatusCode.UNAUTHENTICATED) == 4016
    assert s["status"]["detail"] == grpc_detail and grpc_detail in msg["text"]
    assert not s["sessionStarted"]

    # 正確的權杖：會話開始；暫停麥克風後 idle_timeout_s 內沒有音訊，伺服器結束會話。
    box = d.find_element("id", "token")
    box.clear()
    box.send_keys(TOKEN)
    d.find_element("id", "start").click()
    _wait(d, "window.speakllm.sessionStarted", 20)
    d.find_element("id", "mute").click()
    msg = _message(d, "idle", IDLE_S + 15)
    s = _state(d)
    assert s["close"]["code"] == close_code(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert s["status"]["code"] == "DEADLINE_EXCEEDED"
    assert f"idle_timeout_s={IDLE_S:g}" in s["status"]["detail"]
    assert s["status"]["detail"] in msg["text"]
    assert s["consoleErrors"] == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_browser
def test_page_shows_server_down(assets, engine, quiet_browser) -> None:
    """gRPC 後端沒在執行 → UNAVAILABLE（4014）；會話中伺服器關機 → 帶原因的結束；之後連不上。"""
    d = quiet_browser
    cfg = _cfg(assets)
    cfg.web_grpc_target = f"127.0.0.1:{_free_port()}"
    with WebThread(cfg) as wt:
        assert wt.server.grpc_server is None  # 只橋接，不載入模型
        _open(d, f"{wt.url}?token={TOKEN}&aec=0")
        d.find_element("id", "start").click()
        msg = _message(d, "unavailable", 30)
        s = _state(d)
        assert s["close"]["code"] == close_code(grpc.StatusCode.UNAVAILABLE) == 4014
        assert s["status"]["code"] == "UNAVAILABLE" and s["status"]["detail"] in msg["text"]

    wt = WebThread(_cfg(assets), engine).__enter__()
    try:
        _open(d, f"{wt.url}?token={TOKEN}&aec=0")
        d.find_element("id", "start").click()
        _wait(d, "window.speakllm.sessionStarted", 20)
    finally:
        wt.stop(0)
    msg = _message(d, "ended", 20)
    assert "server shutdown" in msg["text"]
    _wait(d, "window.speakllm.close !== null", 20)
    d.find_element("id", "start").click()
    msg = _message(d, "connect", 20)
    assert "python -m export.serving.web" in msg["text"]
    assert _state(d)["close"]["opened"] is False


@needs_browser
def test_page_shows_refused_microphone(web) -> None:
    d = _chrome(None)
    try:
        _open(d, f"{web.url}?token={TOKEN}")
        d.find_element("id", "start").click()
        msg = _message(d, "mic", 20)
        s = _state(d)
    finally:
        d.quit()
    assert "麥克風被拒絕" in msg["text"]
    assert not s["started"] and s["close"] is None


# ---------------------------------------------------------------- 不開瀏覽器的橋接測試


async def _ws_session(url: str, frames: list[bytes], start: dict[str, Any] | None) -> dict:
    import aiohttp

    out: dict[str, Any] = {"json": [], "audio": []}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            if start is not None:
                await ws.send_json(start)
            for f in frames:
                await ws.send_bytes(f)
            if start is not None:
                await ws.send_json({"type": "end"})
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    seq, rate = AUDIO_HEADER.unpack_from(msg.data)
                    out["audio"].append((seq, rate, msg.data[AUDIO_HEADER.size :]))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    out["json"].append(json.loads(msg.data))
                else:
                    out["reason"] = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None
                    break
            out["code"] = ws.close_code
    return out


def _pcm_frames(wave: np.ndarray) -> list[bytes]:
    from export.serving.client import to_pcm16

    return [to_pcm16(wave[i : i + FRAME_SAMPLES]) for i in range(0, len(wave), FRAME_SAMPLES)]


def test_bridge_relays_the_same_session_as_grpc(web, speech) -> None:
    """同一段音訊與選項經 WebSocket 橋接與直接經 gRPC：事件、文字與每個音訊封包都相同。"""
    question, _ = speech
    wave = np.concatenate([question[: int(1.2 * SR)], np.zeros(int(1.6 * SR), np.float32)])
    emo = "<|emo_happy|>"  # 條件也經 start 訊息轉成 SessionOptions（改變模型的輸出）
    direct = stream_audio(web.server.target, wave, fast=True, token=TOKEN, condition=emo)
    assert direct.status == grpc.StatusCode.OK, direct.detail
    url = f"{web.url}ws?token={TOKEN}"
    start = {"type": "start", "sample_rate": SR, "policy": "vad", "condition": emo}
    got = asyncio.run(_ws_session(url, _pcm_frames(wave), start))
    assert got["code"] == 1000
    events = [(e.kind, e.frame, e.turn, e.detail, e.user_onset_frame) for e in direct.events()]
    assert events and pb.Event.SPEAKING in [e[0] for e in events]
    ws_events = [
        (pb.Event.Kind.Value(j["kind"]), j["frame"], j["turn"], j["detail"], j["user_onset_frame"])
        for j in got["json"]
        if j["type"] == "event"
    ]
    assert ws_events == events
    assert [(a.seq, a.sample_rate, a.pcm16) for a in direct.of("audio")] == got["audio"]
    assert [t.text for t in direct.of("text")] == [
        j["text"] for j in got["json"] if j["type"] == "text"
    ]
    assert len([j for j in got["json"] if j["type"] == "metrics"]) == len(direct.of("metrics"))


def test_bridge_maps_errors_to_close_codes(web) -> None:
    """錯誤狀態 → 4000 + 狀態碼，關閉原因與 status 訊息帶 gRPC 伺服器的同一段說明。"""
    grpc_detail = stream_audio(web.server.target, np.zeros(SR, np.float32), token="wrong").detail
    got = asyncio.run(_ws_session(f"{web.url}ws?token=wrong", [], {"type": "start"}))
    assert got["code"] == 4016 and got["reason"] == grpc_detail, got
    (status,) = [j for j in got["json"] if j["type"] == "status"]
    assert status == {
        "type": "status",
        "code": "UNAUTHENTICATED",
        "status": 16,
        "detail": grpc_detail,
    }
    # 第一則不是 start（直接送音訊）：伺服器的 INVALID_ARGUMENT。
    frames = _pcm_frames(np.zeros(FRAME_SAMPLES * 2, np.float32))
    got = asyncio.run(_ws_session(f"{web.url}ws?token={TOKEN}", frames, None))
    assert got["code"] == 4003
    (status,) = [j for j in got["json"] if j["type"] == "status"]
    assert status["code"] == "INVALID_ARGUMENT" and "START" in status["detail"]
