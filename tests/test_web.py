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
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf

from configs.serving import get_config
from export.serving import duplex_pb2 as pb
from export.serving.client import FRAME_SAMPLES, stream_audio
from export.serving.server import build_demo_assets
from export.serving.session import load_engine
from export.serving.web import AUDIO_HEADER, WebThread, close_code
from speakllm_jax.data.demo_corpus import synth

SR = 16000
FRAME_S = FRAME_SAMPLES / SR
TOKEN = "web-secret"
IDLE_S = 2.0  # 測試用的短閒置逾時（預設 10 秒）
QUANTUM_S = 128 / SR  # Web Audio 的渲染量子：播放端量測的時間解析度
REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "test-output" / "web"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="需要 Debian 的 chromium 與 chromium-driver（bash launch/setup.sh 以 apt 安裝）",
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_demo_assets(tmp_path_factory.getbasetemp() / "serving_assets")


@pytest.fixture(scope="module")
def engine(assets):
    return load_engine(*assets)


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


def _chrome(wav: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        # `%noloop`：檔案只播一次（Chromium 預設會循環播放假麥克風的檔案）。
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    ):
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
    # 提問 → 1.4 秒靜音（320 ms 後助理開口，最多說 3 秒）→ 插話 1.2 秒 → 靜音（助理再開口）。
    wave = np.concatenate([z(0.6), question, z(1.4), barge[: int(1.2 * SR)], z(3.0)])
    driver = _chrome(_write_wav(tmp_path / "mic.wav", wave))
    try:
        _open(driver, f"{web.url}?token={TOKEN}&aec=0")
        driver.find_element("id", "start").click()
        _wait(driver, "window.speakllm.sessionStarted", 20)
        _wait(driver, "window.speakllm.events.some(e => e.kind === 'YIELDED')", 30)
        # 讓插話之後的下一輪也開口，播放端量測完整。
        _wait(
            driver,
            "(() => { const s = window.speakllm; const y = s.events.find(e => e.kind === 'YIELDED');"
            " return s.chunks.some(c => c.turn > y.turn); })()",
            20,
        )
        time.sleep(0.5)
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
    assert len(yields) == 1 and yields[0]["detail"] == "barge-in", yields
    y = yields[0]
    onset, turn = y["user_onset_frame"], y["turn"]
    ours = [c for c in s["chunks"] if c["turn"] == turn]
    assert ours, "助理音訊應已排進播放"
    assert not s["seqProblems"], s["seqProblems"]
    # 清空：收到 YIELDED 的同一幀內，這一輪所有還沒播完的片段都停在清空的時間。
    (flush,) = [f for f in s["flushes"] if f["reason"] == "yielded"]
    assert flush["at"] - flush["receivedAt"] <= FRAME_S
    for c in ours:
        assert (c["stoppedAt"] if c["stoppedAt"] is not None else c["end"]) <= flush["at"] + 1e-6
    # 使用者起點放在播放時鐘上：第 onset 幀的助理音訊原本要播的時間（同一時間軸，每幀 40 ms）。
    before = [c for c in ours if c["seq"] <= onset]
    assert before, "插話應落在助理說話期間"
    ref = max(before, key=lambda c: c["seq"])
    onset_play = ref["start"] + (onset - ref["seq"]) * FRAME_S
    next_turn = min(c["start"] for c in s["chunks"] if c["turn"] > turn)
    end = s["close"]["at"]
    played = _overlap(s["audible"], onset_play, next_turn, end)
    after_flush = _overlap(s["audible"], flush["at"] + FRAME_S, next_turn, end)
    onset_mic = s["frameTimes"][onset]
    played_mic = _overlap(s["audible"], onset_mic, next_turn, end)
    print(
        f"起點後播出的助理音訊：播放時鐘 {played * 1000:.0f} ms、麥克風時鐘 {played_mic * 1000:.0f} ms；"
        f"YIELDED 在起點後 {(y['at'] - onset_mic) * 1000:.0f} ms 收到；"
        f"首輪頁面延遲 {s['turns']['0']['latencyMs']:.0f} ms"
    )
    # 量測以渲染量子（8 ms）為單位：容許一個量子的量化誤差。
    assert played <= 2 * FRAME_S + QUANTUM_S, played
    assert after_flush <= QUANTUM_S, after_flush
    assert _overlap(s["audible"], ours[0]["start"], onset_play, end) > 0.2, "插話前助理應在說話"
    assert s["consoleErrors"] == [] and logs == [], (s["consoleErrors"], logs)
