"""音訊讀寫與壞檔判定：以 espeak-ng 真實語音與刻意做壞的檔案測試。"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from speakllm_jax.audio.io import (
    AudioError,
    SkipCounter,
    audio_info,
    check_audio,
    load_audio,
    write_audio,
)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="需要 espeak-ng")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    d = tmp_path_factory.mktemp("io")
    p = d / "zh.wav"
    subprocess.run(
        ["espeak-ng", "-v", "cmn", "-s", "160", "-w", str(p), "今天天氣很好。"], check=True
    )
    return p


def test_load_resamples_to_target(speech_wav):
    info = audio_info(speech_wav)
    assert info["sample_rate"] == 22050 and info["channels"] == 1
    wave = load_audio(speech_wav, target_sr=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - info["duration"]) < 1e-3
    # 重取樣不應改變能量太多（低通後頻寬內的語音能量保留）
    orig, _ = sf.read(speech_wav, dtype="float32")
    assert abs(np.sqrt(np.mean(wave**2)) / np.sqrt(np.mean(orig**2)) - 1) < 0.1


def test_offset_duration_and_stereo(speech_wav, tmp_path):
    mono = load_audio(speech_wav, target_sr=None)
    sr = audio_info(speech_wav)["sample_rate"]
    stereo = np.stack([mono, -0.5 * mono])
    p = write_audio(tmp_path / "st.wav", stereo, sr)
    assert audio_info(p)["channels"] == 2
    seg = load_audio(p, target_sr=16000, offset=0.5, duration=0.25, mono=False)
    assert seg.shape == (2, 4000)
    # 兩個聲道保持分開：聲道 1 約為聲道 0 的 -0.5 倍
    ratio = np.dot(seg[1], seg[0]) / np.dot(seg[0], seg[0])
    assert abs(ratio + 0.5) < 0.02
    with pytest.raises(AudioError) as ei:
        load_audio(p, offset=100.0)
    assert ei.value.reason == "too_short" and ei.value.path == str(p)
    with pytest.raises(AudioError) as ei:
        load_audio(p, max_seconds=0.1)
    assert ei.value.reason == "too_long"


def test_broken_files_have_reasons(speech_wav, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "trunc.wav").write_bytes(speech_wav.read_bytes()[:3000])
    expect = {
        "empty.wav": "empty",
        "noise.wav": "corrupt",
        "trunc.wav": "truncated",
        "nope.wav": "missing",
    }
    skips = SkipCounter()
    for name, reason in expect.items():
        with pytest.raises(AudioError) as ei:
            load_audio(tmp_path / name)
        assert ei.value.reason == reason, name
        assert name in str(ei.value)
        skips.add_error(name, ei.value)
    with pytest.raises(AudioError) as ei:
        load_audio(speech_wav, expected_sr=16000)
    assert ei.value.reason == "wrong_rate"
    rep = skips.report()
    assert rep["total"] == 4 and rep["by_reason"] == {r: 1 for r in expect.values()}
    out = skips.write_jsonl(tmp_path / "skips.jsonl")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4


def test_skip_counter_merges_batches_and_restores_counts():
    """同一個計數器也給資料管線與訓練迭代器用：併入批次的 `skipped`、dict 與另一個計數器，
    只計數時不留明細，計數可存成 dict 再恢復。"""
    counter = SkipCounter(keep_items=False)
    counter.add("a", "too_long", "9 秒")
    counter.update({"skipped": {"too_long": 2, "bad_row": 1}, "mel": np.zeros(3)})
    counter.update({"empty_text": 1})
    other = SkipCounter()
    other.add("b", "bad_row")
    counter.update(other)
    assert counter.as_dict() == {"bad_row": 2, "empty_text": 1, "too_long": 3}
    assert counter.total == len(counter) == 6 and counter.items == []
    assert other.items == [("b", "bad_row", "")]
    restored = SkipCounter(keep_items=False)
    restored.load_counts(counter.as_dict())
    assert restored.as_dict() == counter.as_dict()
    with pytest.raises(TypeError):
        counter.update(3)


def test_check_audio_clip_and_silence(speech_wav):
    wave = load_audio(speech_wav)
    assert check_audio(wave, 16000) is None
    assert check_audio(np.clip(wave * 20, -1, 1), 16000) == "clipped"
    assert check_audio(np.zeros(16000, np.float32), 16000) == "silent"
    assert check_audio(wave, 16000, max_seconds=0.5) == "too_long"
    assert check_audio(wave, 8000, expected_sr=16000) == "wrong_rate"


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3", "opus"])
def test_write_read_roundtrip(speech_wav, tmp_path, ext):
    wave = load_audio(speech_wav, target_sr=16000)
    p = write_audio(tmp_path / f"x.{ext}", wave, 16000)
    back = load_audio(p, target_sr=16000)
    assert abs(len(back) - len(wave)) < 0.05 * 16000
    n = min(len(back), len(wave))
    if ext in ("wav", "flac"):
        assert np.max(np.abs(back[:n] - wave[:n])) < 1e-3
    else:  # 有損編碼：能量相近即可
        assert abs(np.std(back[:n]) / np.std(wave[:n]) - 1) < 0.2
