"""語料登錄表、資料設定與下載：條款把關、離線立即失敗、續傳與校驗、本機副本註冊。"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from speakllm_jax.data.adapters import ADAPTERS
from speakllm_jax.data.demo_corpus import has_espeak
from speakllm_jax.data.registry import (
    REGISTRY,
    DownloadError,
    download_corpus,
    download_file,
    extract_archive,
    load_config,
    read_local_registry,
    register_local,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "data").glob("[!_]*.py"))


def test_registry_entries_are_complete():
    assert {
        "aishell1",
        "aishell3",
        "wenetspeech",
        "kespeech",
        "magicdata_ramc",
        "commonvoice_zh_cn",
        "commonvoice_zh_tw",
        "commonvoice_en",
        "covost2",
        "talcs",
        "emilia",
        "librispeech",
        "libritts",
        "esd",
        "voiceassistant_400k",
        "instructs2s_200k",
    } <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert spec.layout in ADAPTERS, spec.name
        assert spec.license and spec.size and spec.homepage.startswith("http")
        if spec.source == "url":
            assert spec.resources and all(r.url.startswith("https://") for r in spec.resources)
        if spec.source == "hf":
            assert spec.hf_id and "/" in spec.hf_id
        for r in spec.resources:
            if r.checksum:
                algo, _, digest = r.checksum.partition(":")
                assert len(digest) == {"md5": 32, "sha256": 64}[algo]
        if spec.non_commercial:
            assert spec.requires_acceptance


def test_configs_reference_registry_and_adapters():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "asr_zh", "asr_en", "tts", "instructions", "duplex"} <= names
    for p in CONFIGS:
        cfg = load_config(p)
        assert cfg.corpora, p
        for c in cfg.corpora:
            assert c["adapter"] in ADAPTERS, (p, c)
            if c.get("registry"):
                assert c["registry"] in REGISTRY, (p, c)
        assert set(cfg.download) <= set(REGISTRY)


def test_docs_cover_registry():
    doc = (REPO / "docs" / "datasets.md").read_text("utf-8")
    for spec in REGISTRY.values():
        assert f"`{spec.name}`" in doc, spec.name
        assert spec.license.split("（")[0] in doc, spec.name
    for name in ADAPTERS:
        assert f"`{name}`" in doc, name


def test_terms_gate_and_dry_run(tmp_path):
    logs: list[str] = []
    with pytest.raises(DownloadError, match="accept_terms"):
        download_corpus("wenetspeech", tmp_path, log=logs.append)
    assert any("非商業" in s for s in logs)  # 條款先印出
    plan = download_corpus("magicdata_ramc", tmp_path, dry_run=True, log=logs.append)
    assert plan["status"] == "dry_run" and plan["needs_accept_terms"]
    assert not (tmp_path / "magicdata_ramc").exists()
    with pytest.raises(DownloadError, match="--local"):
        download_corpus("kespeech", tmp_path, accept_terms=True, log=logs.append)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="--local"):
        download_file(f"http://127.0.0.1:{_closed_port()}/data.tgz", tmp_path / "x.tgz")
    assert time.perf_counter() - t0 < 5
    t0 = time.perf_counter()
    with pytest.raises(DownloadError):  # 不可路由的位址：在連線逾時內失敗
        download_file("http://10.255.255.1:81/data.tgz", tmp_path / "y.tgz", connect_timeout=1.0)
    assert time.perf_counter() - t0 < 4
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/download.py"),
            "--names",
            "aishell1",
            "--output_dir",
            str(tmp_path),
            "--connect_timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "Apache-2.0" in res.stdout and "--local" in res.stderr


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        data, code = self.payload, 200
        if rng:
            type(self).ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            data, code = self.payload[start:], 206
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        body = b"BAC009S0002W0122 hello\n" * 2000
        info = tarfile.TarInfo("data_aishell/transcript/aishell_transcript_v0.8.txt")
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    _RangeHandler.payload = buf.getvalue()
    _RangeHandler.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data_aishell.tgz", _RangeHandler
    httpd.shutdown()


def test_resumable_download_and_checksum(server, tmp_path):
    url, handler = server
    md5 = "md5:" + hashlib.md5(handler.payload).hexdigest()
    dest = tmp_path / "data_aishell.tgz"
    half = len(handler.payload) // 2
    (tmp_path / "data_aishell.tgz.part").write_bytes(handler.payload[:half])
    got = download_file(url, dest, md5, log=lambda s: None)
    assert got.read_bytes() == handler.payload
    assert handler.ranges == [f"bytes={half}-"]
    assert not (tmp_path / "data_aishell.tgz.part").exists()
    extract_archive(got, tmp_path / "x")
    assert (tmp_path / "x/data_aishell/transcript/aishell_transcript_v0.8.txt").is_file()
    # 已存在且校驗通過：不再下載
    download_file(url, dest, md5, log=lambda s: None)
    assert handler.ranges == [f"bytes={half}-"]
    with pytest.raises(DownloadError, match="校驗碼"):
        download_file(url, tmp_path / "bad.tgz", "md5:" + "0" * 32, log=lambda s: None)
    assert (tmp_path / "bad.tgz.part.bad").is_file() and not (tmp_path / "bad.tgz").exists()


def test_local_registration_cli(tmp_path):
    copy = tmp_path / "mycopy"
    copy.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/download.py"),
            "--config",
            str(REPO / "configs/data/asr_zh.py"),
            "--output_dir",
            str(tmp_path / "raw"),
            "--local",
            f"aishell1={copy}",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    reg = read_local_registry(tmp_path / "raw")
    assert (
        reg["aishell1"]["path"] == str(copy.resolve()) and reg["aishell1"]["layout"] == "aishell1"
    )
    with pytest.raises(FileNotFoundError):
        register_local("aishell1", tmp_path / "nope", tmp_path / "raw")
    with pytest.raises(ValueError, match="未知的語料"):
        register_local("not_a_corpus", copy, tmp_path / "raw")


def test_hf_token_from_env_then_dotenv(tmp_path, monkeypatch):
    from speakllm_jax.data.registry import HF_TOKEN_ENV, hf_token

    monkeypatch.delenv(HF_TOKEN_ENV, raising=False)
    env_file = tmp_path / ".env"
    assert hf_token(env_file) is None
    env_file.write_text("# 範本\nOTHER=1\nHF_TOKEN=hf_from_file\n", "utf-8")
    assert hf_token(env_file) == "hf_from_file"
    monkeypatch.chdir(tmp_path)
    assert hf_token() == "hf_from_file"  # 預設讀目前資料夾的 .env
    monkeypatch.setenv(HF_TOKEN_ENV, "hf_from_env")
    assert hf_token(env_file) == "hf_from_env"  # 環境變數優先


def test_gated_hf_corpus_needs_token_and_never_prints_it(tmp_path, monkeypatch):
    from speakllm_jax.data.registry import HF_TOKEN_ENV

    monkeypatch.delenv(HF_TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # 沒有 .env
    monkeypatch.setattr("speakllm_jax.data.registry._REPO_ROOT", tmp_path)
    logs: list[str] = []
    with pytest.raises(DownloadError, match=f"{HF_TOKEN_ENV}.*\\.env"):
        download_corpus("commonvoice_en", tmp_path, accept_terms=True, log=logs.append)
    secret = "hf_secret_value_123"
    (tmp_path / ".env").write_text(f"HF_TOKEN={secret}\n", "utf-8")
    res = subprocess.run(
        [sys.executable, str(REPO / "data/download.py"), "--names", "commonvoice_en"]
        + ["--accept_terms", "--output_dir", str(tmp_path / "raw"), "--connect_timeout", "0.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9"},
        timeout=120,
    )
    assert secret not in res.stdout + res.stderr
    assert "需要 Hugging Face 權杖" not in res.stderr  # 權杖從 .env 讀到了


@pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
def test_demo_download_generates_offline(tmp_path):
    logs: list[str] = []
    plan = download_corpus("demo", tmp_path / "demo", log=logs.append)
    assert plan["status"] == "generated" and plan["target"] == str(tmp_path / "demo")
    assert (tmp_path / "demo" / "demo_info.json").is_file()
    assert (tmp_path / "demo" / "aishell" / "data_aishell").is_dir()
