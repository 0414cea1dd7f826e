"""webrtcvad 切分：與示範語料 vad_truth 的已知靜音比對，以及整份清單的重取樣切分。"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakllm_jax.audio.io import load_audio, resample, write_audio
from speakllm_jax.audio.vad import VadConfig, speech_segments, split_utterances
from speakllm_jax.data.adapters import build_manifests
from speakllm_jax.data.demo_corpus import ensure_demo_corpus, has_espeak, synth
from speakllm_jax.data.manifest import read_manifest
from speakllm_jax.data.registry import load_config

pytestmark = pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
REPO = Path(__file__).resolve().parents[1]
TOL = 0.1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")


@pytest.fixture(scope="module")
def demo_manifest(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("vadm") / "demo.jsonl"
    build_manifests(
        load_config(REPO / "configs/data/demo.py"), out, data_root=demo, log=lambda s: None
    )
    return out


@pytest.mark.parametrize("aggressiveness", [1, 2, 3])
def test_segments_match_inserted_silences(demo, aggressiveness):
    truth = json.loads((demo / "vad" / "vad_truth.json").read_text("utf-8"))
    assert truth
    for rec in truth.values():
        wave = load_audio(demo / "vad" / rec["audio"], target_sr=16000)
        segs = speech_segments(wave, 16000, VadConfig(aggressiveness=aggressiveness))
        assert len(segs) == len(rec["speech"]), (segs, rec["speech"])
        for (s, e), (ts, te) in zip(segs, rec["speech"]):
            assert abs(s - ts) <= TOL and abs(e - te) <= TOL, ((s, e), (ts, te))


def test_vad_on_other_rates_and_config_errors(demo):
    rec = next(iter(json.loads((demo / "vad" / "vad_truth.json").read_text("utf-8")).values()))
    wave = load_audio(demo / "vad" / rec["audio"], target_sr=16000)
    # 22.05 kHz 不是 webrtcvad 支援的取樣率：內部重取樣後結果一樣準
    segs = speech_segments(resample(wave, 16000, 22050), 22050)
    for (s, e), (ts, te) in zip(segs, rec["speech"]):
        assert abs(s - ts) <= TOL and abs(e - te) <= TOL
    with pytest.raises(ValueError, match="aggressiveness"):
        VadConfig(aggressiveness=4)
    with pytest.raises(ValueError, match="frame_ms"):
        VadConfig(frame_ms=25)


def test_split_cuts_only_in_silence():
    segs = [(0.5, 3.0), (3.6, 7.5), (8.4, 9.0), (9.5, 22.0)]
    pieces = split_utterances(segs, 23.0, max_seconds=8.0, pad=0.1)
    assert all(e - s <= 8.0 + 1e-6 for s, e in pieces)
    for (_, e1), (s2, _) in zip(pieces, pieces[1:]):
        assert e1 <= s2
    speech = [(s, e) for s, e in segs if e - s <= 8.0]
    for s, e in speech:  # 夠短的語音段完整落在某一片段內
        assert any(ps <= s and e <= pe for ps, pe in pieces), (s, e, pieces)
    # 12.5 秒的語音段中間沒有靜音：只能等分硬切
    cuts = [e1 for (_, e1), _ in zip(pieces, pieces[1:])]
    assert sum(1 for c in cuts if 9.5 < c < 22.0) >= 1


def test_resample_split_demo(demo_manifest, demo, tmp_path):
    out = tmp_path / "rs"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/resample_split.py"),
            "--manifest",
            str(demo_manifest),
            "--output_dir",
            str(out),
            "--target_sr",
            "8000",
            "--vad",
            "True",
            "--max_seconds",
            "6",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    rows = read_manifest(out / "manifest.jsonl")
    truth = json.loads((demo / "vad" / "vad_truth.json").read_text("utf-8"))
    skipped = [json.loads(x) for x in (out / "manifest.skipped.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in skipped} <= {"too_long"}
    for r in rows:
        path = out / r["audio"]
        info = sf.info(str(path))
        assert info.samplerate == 8000 and r["sample_rate"] == 8000
        assert abs(info.duration - r["duration"]) < 0.01
        assert r["duration"] <= 6.0 or r["channels"] == 2
        assert r["source_end"] > r["source_start"] >= 0
    dialogues = [r for r in rows if r["corpus"] == "demo_dialogue"]
    assert dialogues and all(r["channels"] == 2 for r in dialogues)
    for r in dialogues:  # 對話不切分：長度與原檔相同、兩聲道保留
        src = sf.info(r["source_audio"])
        assert (
            abs(src.duration - r["duration"]) < 0.01
            and sf.info(str(out / r["audio"])).channels == 2
        )
        assert r["turns"] and r["overlaps"]
    for vid, rec in truth.items():
        pieces = sorted((r for r in rows if r["source_id"] == vid), key=lambda r: r["source_start"])
        assert len(pieces) >= 2
        # 每個切點都落在某段插入的靜音之內
        for a, b in zip(pieces, pieces[1:]):
            cut_lo, cut_hi = a["source_end"], b["source_start"]
            assert any(s - TOL <= cut_lo and cut_hi <= e + TOL for s, e in rec["silences"])
        # 文字依 turns 分配，合起來就是原本的句子
        assert [t["text"] for p in pieces for t in p["turns"]] == rec["texts"]
        # 片段的音訊確實是原檔在 source_start 之後的內容
        src = load_audio(demo / "vad" / rec["audio"], target_sr=8000)
        p0 = load_audio(out / pieces[0]["audio"], target_sr=8000)
        k = int(round(pieces[0]["source_start"] * 8000))
        ref = src[k : k + len(p0)]
        assert np.corrcoef(ref, p0[: len(ref)])[0, 1] > 0.99


def test_resample_split_broken_inputs(tmp_path):
    from speakllm_jax.audio.vad import resample_split

    speech = synth("今天天氣很好", "cmn", 50, 170)
    d = tmp_path / "in"
    write_audio(d / "good.wav", speech, 16000)
    (d / "empty.wav").parent.mkdir(parents=True, exist_ok=True)
    (d / "empty.wav").write_bytes(b"")
    (d / "trunc.wav").write_bytes((d / "good.wav").read_bytes()[:2000])
    (d / "noise.wav").write_bytes(np.random.default_rng(2).bytes(4000))
    write_audio(d / "rate8k.wav", resample(speech, 16000, 8000), 8000)
    write_audio(d / "clipped.wav", np.clip(speech * 30, -1, 1), 16000)
    write_audio(d / "quiet.wav", np.zeros(16000, np.float32), 16000)
    dur = len(speech) / 16000

    def row(i, audio, **kw):
        r = {
            "id": i,
            "audio": audio,
            "offset": 0.0,
            "duration": round(dur, 3),
            "sample_rate": 16000,
            "channels": 1,
            "text": "今天天气很好",
            "language": "zh",
            "speaker": "s",
            "corpus": "t",
            "split": "train",
        }
        r.update(kw)
        return json.dumps(r, ensure_ascii=False).encode()

    lines = [
        row("good", "good.wav"),
        row("empty", "empty.wav"),
        row("trunc", "trunc.wav"),
        row("noise", "noise.wav"),
        row("gone", "gone.wav"),
        row("rate", "rate8k.wav"),
        row("clip", "clipped.wav"),
        row("quiet", "quiet.wav", duration=1.0),
        row("nolang", "good.wav", language="fr"),
        b'{"id": "x", broken',
        "不是 UTF-8".encode("gb18030"),
    ]
    (d / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = resample_split(d / "m.jsonl", tmp_path / "out", log=lambda s: None)
    assert summary["output_rows"] == 1
    assert summary["skipped"]["by_reason"] == {
        "empty": 1,
        "truncated": 1,
        "corrupt": 1,
        "missing": 1,
        "wrong_rate": 1,
        "clipped": 1,
        "silent": 1,
        "bad_field": 1,
        "bad_json": 1,
        "non_utf8": 1,
    }
    out = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert out[0]["id"] == "good" and (tmp_path / "out" / out[0]["audio"]).is_file()
