"""客戶端 CLI 的結束路徑（真實伺服器、本機迴路）：串流以錯誤狀態結束時結束碼 2、一行訊息、不寫回覆檔。"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from configs.serving import get_config
from export.serving.client import main as client_main
from export.serving.server import ServerThread
from speakllm_jax.cli import run_cli

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(assets, engine):
    # 與其他服務端測試共用同一份示範資產（conftest 的 `assets`，整次 pytest 只建一次）。
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir = map(str, assets)
    cfg.port = 0
    cfg.auth_token = TOKEN
    cfg.max_session_seconds = 1.0
    with ServerThread(cfg, engine) as st:
        yield st


@pytest.fixture(scope="module")
def wavs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client_exit")
    out = {}
    for name, seconds in (("short", 0.4), ("long", 2.0)):
        out[name] = d / f"{name}.wav"
        sf.write(out[name], np.zeros(int(16000 * seconds), np.float32), 16000)
    return out


def _client(server, audio: Path, out: Path, token: str) -> list[str]:
    return [
        "stream",
        "--audio",
        str(audio),
        "--out",
        str(out),
        "--target",
        server.target,
        "--token",
        token,
        "--fast",
        "--tail-seconds",
        "0",
    ]


def test_ok_stream_writes_reply(server, wavs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reply.wav"
    assert run_cli(client_main, _client(server, wavs["short"], out, TOKEN)) == 0
    assert out.exists() and "status: OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("audio", "token", "status"),
    [("long", TOKEN, "OUT_OF_RANGE"), ("short", "wrong", "UNAUTHENTICATED")],
)
def test_error_status_exits_2_without_reply(
    server, wavs, tmp_path: Path, capsys, audio: str, token: str, status: str
) -> None:
    out = tmp_path / "reply.wav"
    assert run_cli(client_main, _client(server, wavs[audio], out, token)) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"錯誤：串流以 {status} 結束")
    assert not out.exists() and "reply written" not in captured.out
