"""清單格式與各語料轉接器：示範語料的真實輸出，以及其他語料依真實目錄格式寫成的小型樣本。"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speakllm_jax.audio.io import SkipCounter, load_audio, resample, write_audio
from speakllm_jax.data.adapters import ADAPTERS, build_manifests, run_adapter
from speakllm_jax.data.demo_corpus import ensure_demo_corpus, has_espeak, synth
from speakllm_jax.data.manifest import (
    REQUIRED_FIELDS,
    read_manifest,
    resolve_audio,
    validate_row,
    write_manifest,
)
from speakllm_jax.data.registry import load_config, register_local


def _row(audio: str, **kw) -> dict:
    row = {
        "id": "u1",
        "audio": audio,
        "offset": 0.0,
        "duration": 1.0,
        "sample_rate": 16000,
        "channels": 1,
        "text": "你好 world",
        "language": "mixed",
        "speaker": "S1",
        "corpus": "t",
        "split": "train",
    }
    row.update(kw)
    return row


def test_validate_row_names_fields(tmp_path):
    write_audio(tmp_path / "a.wav", 0.1 * np.sin(np.arange(16000) / 5.0), 16000)
    assert validate_row(_row("a.wav"), base_dir=tmp_path, check_audio=True) == []
    for k in REQUIRED_FIELDS:
        bad = _row("a.wav")
        del bad[k]
        probs = validate_row(bad)
        assert probs and probs[0].startswith(k + ":"), (k, probs)
    probs = validate_row(
        _row("a.wav", language="fr", duration=-1, channels=1, channel_roles=["user", "assistant"])
    )
    fields = {p.split(":")[0] for p in probs}
    assert {"language", "duration", "channel_roles"} <= fields
    probs = validate_row(_row("a.wav", overlaps=[{"start": 0.2, "end": 0.1, "kind": "cough"}]))
    assert any(p.startswith("overlaps[0]") for p in probs)
    assert any(p.startswith("overlaps[0].kind") for p in probs)
    # 檔案層級：取樣率不符、片段超出檔尾、缺檔
    probs = validate_row(_row("a.wav", sample_rate=8000), base_dir=tmp_path, check_audio=True)
    assert [p.reason for p in probs] == ["wrong_rate"]
    probs = validate_row(_row("a.wav", offset=0.5), base_dir=tmp_path, check_audio=True)
    assert [p.reason for p in probs] == ["too_short"] and probs[0].startswith("duration")
    probs = validate_row(_row("b.wav"), base_dir=tmp_path, check_audio=True)
    assert [p.reason for p in probs] == ["missing"] and "b.wav" in probs[0]


def test_read_write_manifest_skips_bad_lines(tmp_path):
    rows = [_row(f"{i}.wav", id=f"u{i}") for i in range(3)]
    p = tmp_path / "m.jsonl"
    assert write_manifest(p, rows) == 3
    assert read_manifest(p) == rows
    assert not list(tmp_path.glob(".*tmp"))
    with p.open("ab") as f:
        f.write(b'{"id": "broken"\n')
        f.write("\xff\xfe 不是 UTF-8\n".encode("latin-1", "replace").replace(b"?", b"\xff"))
        f.write(b"[1, 2]\n\n")
        f.write(json.dumps(_row("z.wav", id="last")).encode() + b"\n")
    skips = SkipCounter()
    got = read_manifest(p, skips)
    assert [r["id"] for r in got] == ["u0", "u1", "u2", "last"]
    assert skips.report()["by_reason"] == {"bad_json": 2, "non_utf8": 1}
    assert {k.rsplit(":", 1)[1] for k, _, _ in skips.items} == {"4", "5", "6"}


def test_resolve_audio_relative_to_manifest(tmp_path):
    assert resolve_audio(_row("wav/a.wav"), tmp_path) == tmp_path / "wav" / "a.wav"
    assert resolve_audio(_row("/abs/a.wav"), tmp_path).as_posix() == "/abs/a.wav"


# ---------------------------------------------------------------- 轉接器

needs_espeak = pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speech():
    """一段真實（espeak-ng）中文語音，16 kHz。"""
    return synth("今天天氣很好", "cmn", 50, 170)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")


def _wav(path: Path, wave, sr: int = 16000) -> Path:
    """把 16 kHz 的語音重取樣到 `sr` 後寫檔（模擬各語料的原生取樣率）。"""
    return write_audio(path, wave if sr == 16000 else resample(wave, 16000, sr), sr)


@needs_espeak
def test_demo_manifest_via_cli(demo, tmp_path):
    out = tmp_path / "m" / "demo.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/build_manifests.py"),
            "--config",
            str(REPO / "configs/data/demo.py"),
            "--data_root",
            str(demo),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    rows = read_manifest(out)
    by = {}
    for r in rows:
        by.setdefault(r["corpus"], []).append(r)
        assert validate_row(r, base_dir=out.parent, check_audio=True) == []
    assert set(by) == {
        "aishell1",
        "commonvoice",
        "demo_dialogue",
        "demo_instructions",
        "demo_longform",
    }
    info = json.loads((demo / "demo_info.json").read_text("utf-8"))["counts"]
    assert len(by["aishell1"]) == info["aishell"]
    assert len(by["commonvoice"]) == info["commonvoice"]
    assert {r["split"] for r in by["aishell1"]} == {"train", "dev", "test"}
    assert {r["language"] for r in by["commonvoice"]} == {"zh", "en", "mixed"}
    # AISHELL 轉寫的空白已去掉，原文保留在 text_raw
    a = by["aishell1"][0]
    assert " " not in a["text"] and a["text_raw"].replace(" ", "") == a["text"]
    d = by["demo_dialogue"][0]
    assert d["channels"] == 2 and d["channel_roles"] == ["user", "assistant"]
    assert {o["kind"] for o in d["overlaps"]} == {"backchannel", "barge_in"}
    ins = by["demo_instructions"][0]
    assert Path(ins["response_audio"]).is_file() and ins["response_text"]
    assert (out.parent / "demo.skipped.jsonl").read_text() == ""
    assert "寫出" in res.stdout


@needs_espeak
def test_aishell3_layout(tmp_path, speech):
    root = tmp_path / "aishell3"
    for split, uid in (("train", "SSB00050001"), ("test", "SSB06930002")):
        _wav(root / split / "wav" / uid[:7] / f"{uid}.wav", speech, 44100)
        (root / split / "content.txt").write_text(
            f"{uid}.wav\t今 jin1 天 tian1 天 tian1 气 qi4 很 hen3 好 hao3\n", "utf-8"
        )
    skips = SkipCounter()
    rows = run_adapter("aishell3", root, skips)
    assert [(r["split"], r["text"], r["speaker"]) for r in rows] == [
        ("train", "今天天气很好", "SSB0005"),
        ("test", "今天天气很好", "SSB0693"),
    ]
    assert rows[0]["source_pinyin"] == "jin1 tian1 tian1 qi4 hen3 hao3"
    assert rows[0]["sample_rate"] == 44100 and len(skips) == 0


@needs_espeak
def test_librispeech_and_libritts_layouts(tmp_path, speech):
    ls = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    write_audio(ls / "84-121123-0000.flac", speech, 16000)
    write_audio(ls / "84-121123-0001.flac", speech, 16000)
    (ls / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
        "84-121123-0002 MISSING AUDIO\n",
        "utf-8",
    )
    skips = SkipCounter()
    rows = run_adapter("librispeech", tmp_path, skips)
    assert [r["id"] for r in rows] == ["84-121123-0000", "84-121123-0001"]
    assert rows[0]["split"] == "dev" and rows[0]["speaker"] == "84" and rows[0]["language"] == "en"
    assert skips.report()["by_reason"] == {"missing": 1}
    tts = tmp_path / "LibriTTS" / "test-clean" / "1089" / "134686"
    _wav(tts / "1089_134686_000001_000001.wav", speech, 24000)
    (tts / "1089_134686.trans.tsv").write_text(
        "1089_134686_000001_000001\tHe hoped there'd be stew.\tHe hoped there would be stew.\n",
        "utf-8",
    )
    rows = run_adapter("libritts", tmp_path / "LibriTTS", SkipCounter())
    assert rows[0]["text"] == "He hoped there would be stew." and rows[0]["split"] == "test"
    assert rows[0]["text_raw"] == "He hoped there'd be stew." and rows[0]["sample_rate"] == 24000


@needs_espeak
def test_wenetspeech_layout(tmp_path, speech):
    long = np.concatenate([speech, np.zeros(8000, np.float32), speech]).astype(np.float32)
    rel = "audio/train/youtube/B00000/Y0000000000_--5llN02F84.opus"
    write_audio(tmp_path / rel, long, 16000)
    dur = len(long) / 16000
    half = len(speech) / 16000
    meta = {
        "audios": [
            {
                "aid": "Y0000000000_--5llN02F84",
                "path": rel,
                "duration": dur,
                "segments": [
                    {
                        "sid": "Y0000000000_--5llN02F84_S00000",
                        "begin_time": 0.0,
                        "end_time": half,
                        "text": "今天天气很好",
                        "confidence": 1.0,
                        "subsets": ["L", "M"],
                    },
                    {
                        "sid": "Y0000000000_--5llN02F84_S00001",
                        "begin_time": half + 0.5,
                        "end_time": dur,
                        "text": "今天天气很好",
                        "confidence": 1.0,
                        "subsets": ["DEV"],
                    },
                    {
                        "sid": "Y0000000000_--5llN02F84_S00002",
                        "begin_time": 1.0,
                        "end_time": dur + 5,
                        "text": "超出",
                        "confidence": 1.0,
                        "subsets": ["M"],
                    },
                ],
            }
        ]
    }
    (tmp_path / "WenetSpeech.json").write_text(json.dumps(meta, ensure_ascii=False), "utf-8")
    skips = SkipCounter()
    rows = run_adapter("wenetspeech", tmp_path, skips, train_subset="M")
    assert [r["split"] for r in rows] == ["train", "dev"]
    assert rows[1]["offset"] == pytest.approx(half + 0.5, abs=1e-3)
    assert skips.report()["by_reason"] == {"too_short": 1}
    seg = load_audio(rows[1]["audio"], offset=rows[1]["offset"], duration=rows[1]["duration"])
    assert abs(len(seg) / 16000 - rows[1]["duration"]) < 0.01


@needs_espeak
def test_magicdata_ramc_layout(tmp_path, speech):
    root = tmp_path / "MDT2021S003"
    long = np.concatenate([speech, speech, speech])
    write_audio(root / "WAV" / "CTS-CN-F2F-2019-11-15-193.wav", long, 16000)
    (root / "TXT").mkdir(parents=True)
    (root / "TXT" / "CTS-CN-F2F-2019-11-15-193.txt").write_text(
        "[0.000,0.400]\tG00000000\t无\t[+]\n"
        "[0.100,1.200]\tG00000140\t女,普通话\t你好[*]啊\n"
        "[1.300,2.100]\tG00000141\t男,普通话\t最近怎么样\n"
        "[2.200,2.900]\tG00000140\t女,普通话\t[LAUGHTER]\n",
        "utf-8",
    )
    skips = SkipCounter()
    rows = run_adapter("magicdata_ramc", tmp_path, skips)
    assert [(r["speaker"], r["text"]) for r in rows] == [
        ("G00000140", "你好啊"),
        ("G00000141", "最近怎么样"),
    ]
    assert rows[1]["offset"] == 1.3 and rows[1]["duration"] == pytest.approx(0.8)
    assert skips.report()["by_reason"] == {"empty_text": 1}


@needs_espeak
def test_kaldi_emilia_esd_jsonl_layouts(tmp_path, speech):
    kd = tmp_path / "kespeech" / "test"
    write_audio(kd / "wav" / "a.wav", speech, 16000)
    (kd / "wav.scp").write_text("u1 wav/a.wav\nu2 wav/missing.wav\n", "utf-8")
    (kd / "text").write_text("u1 今天 天气 很好\nu2 你好\n", "utf-8")
    (kd / "utt2spk").write_text("u1 spk1\nu2 spk2\n", "utf-8")
    skips = SkipCounter()
    rows = run_adapter("kaldi", tmp_path / "kespeech", skips)
    assert [(r["id"], r["text"], r["speaker"], r["split"]) for r in rows] == [
        ("u1", "今天天气很好", "spk1", "test")
    ]
    assert skips.report()["by_reason"] == {"missing": 1}

    em = tmp_path / "emilia" / "ZH" / "ZH-B000000"
    write_audio(em / "ZH_B00000_S00000_W000000.mp3", speech, 24000)
    (em / "ZH_B00000_S00000_W000000.json").write_text(
        json.dumps(
            {
                "id": "ZH_B00000_S00000_W000000",
                "text": "今天天气很好。",
                "speaker": "ZH_B00000_S00000",
                "language": "zh",
                "duration": 1.5,
                "dnsmos": 3.3,
            },
            ensure_ascii=False,
        ),
        "utf-8",
    )
    rows = run_adapter("emilia", tmp_path / "emilia", SkipCounter(), languages=["zh"])
    assert rows[0]["speaker"] == "ZH_B00000_S00000" and rows[0]["source_dnsmos"] == 3.3

    esd = tmp_path / "esd" / "0011"
    write_audio(esd / "Happy" / "0011_000701.wav", speech, 16000)
    write_audio(esd / "Sad" / "0011_001160.wav", speech, 16000)
    (esd / "0011.txt").write_bytes(
        "0011_000701\t打远一看\t快乐\n0011_001160\t它们的确很是美丽\t伤心\n".encode("utf-16")
    )
    rows = run_adapter("esd", tmp_path / "esd", SkipCounter())
    assert [(r["emotion"], r["split"], r["text"]) for r in rows] == [
        ("happy", "dev", "打远一看"),
        ("sad", "train", "它们的确很是美丽"),
    ]

    write_audio(tmp_path / "gen" / "x.wav", speech, 16000)
    (tmp_path / "gen" / "m.jsonl").write_text(
        json.dumps({"id": "g1", "audio": "x.wav", "text": "hello 世界"}, ensure_ascii=False)
        + "\n{bad\n",
        "utf-8",
    )
    skips = SkipCounter()
    rows = run_adapter("jsonl", tmp_path / "gen" / "m.jsonl", skips, corpus="gen")
    assert rows[0]["language"] == "mixed" and rows[0]["sample_rate"] == 16000
    assert validate_row(rows[0], check_audio=True) == [] and skips.counts["bad_json"] == 1


@needs_espeak
def test_single_corpus_cli_and_local_registry(tmp_path, speech):
    base = tmp_path / "copy" / "data_aishell"
    write_audio(base / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav", speech, 16000)
    (base / "transcript").mkdir(parents=True)
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 今天 天气 很 好\n", "utf-8"
    )
    out = tmp_path / "one.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "data/build_manifests.py"),
            "--corpus",
            "aishell1",
            "--root",
            str(tmp_path / "copy"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert read_manifest(out)[0]["text"] == "今天天气很好"
    # 本機副本：asr_zh 設定的 aishell1 改用登記的路徑，其他語料的 root 不存在則報錯
    raw = tmp_path / "raw"
    register_local("aishell1", tmp_path / "copy", raw)
    cfg = load_config(REPO / "configs/data/asr_zh.yaml")  # 種子的 .yaml 名稱
    summary = build_manifests(
        cfg, tmp_path / "zh.jsonl", data_root=raw, only=["aishell1"], log=lambda s: None
    )
    assert summary["rows"] == 1


@needs_espeak
def test_broken_files_are_counted(tmp_path, speech):
    base = tmp_path / "data_aishell"
    wdir = base / "wav" / "train" / "S0002"
    good = ["BAC009S0002W0001", "BAC009S0002W0002"]
    for g in good:
        write_audio(wdir / f"{g}.wav", speech, 16000)
    (wdir / "BAC009S0002W0003.wav").write_bytes(b"")
    (wdir / "BAC009S0002W0004.wav").write_bytes((wdir / f"{good[0]}.wav").read_bytes()[:2000])
    (wdir / "BAC009S0002W0005.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    write_audio(wdir / "BAC009S0002W0006.wav", resample(speech, 16000, 8000), 8000)
    write_audio(wdir / "BAC009S0002W0007.wav", np.clip(speech * 30, -1, 1), 16000)
    write_audio(wdir / "BAC009S0002W0008.wav", speech, 16000)  # 沒有轉寫
    (base / "transcript").mkdir(parents=True)
    lines = [f"BAC009S0002W000{i} 今天 天气 很 好".encode() for i in range(1, 8)]
    lines.append("BAC009S0002W0009 壞掉的 行".encode("gb18030"))  # 非 UTF-8
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_bytes(b"\n".join(lines) + b"\n")
    cfg = {
        "corpora": [{"name": "aishell1", "adapter": "aishell1", "root": str(tmp_path)}],
        "check_audio": "full",
    }
    out = tmp_path / "out.jsonl"
    summary = build_manifests(cfg, out, log=lambda s: None)
    assert summary["rows"] == 2
    assert summary["skipped"]["by_reason"] == {
        "empty": 1,
        "truncated": 1,
        "corrupt": 1,
        "wrong_rate": 1,
        "clipped": 1,
        "no_transcript": 1,
        "non_utf8": 1,
    }
    recs = [json.loads(x) for x in (tmp_path / "out.skipped.jsonl").read_text("utf-8").splitlines()]
    assert len(recs) == 7 and all(r["reason"] and r["key"] for r in recs)
    assert any(r["key"].endswith("aishell_transcript_v0.8.txt:8") for r in recs)


def test_every_adapter_is_tested():
    src = Path(__file__).read_text("utf-8")
    demo_cfg = load_config(REPO / "configs/data/demo.py")
    covered = {c["adapter"] for c in demo_cfg.corpora}
    for name in ADAPTERS:
        assert name in covered or f'"{name}"' in src, name
