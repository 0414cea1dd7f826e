"""內建示範語料：真實目錄格式、決定性、雙聲道對話的時間標註與實際音訊一致。"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakllm_jax.data.demo_corpus import CV_COLUMNS, CV_VERSION, ensure_demo_corpus, has_espeak
from speakllm_jax.text.codeswitch import language_of

pytestmark = pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    t0 = time.perf_counter()
    root = ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")
    return root, time.perf_counter() - t0


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_builds_fast_and_is_deterministic(demo, tmp_path):
    root, seconds = demo
    assert seconds < 60
    out = tmp_path / "again"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "data/make_demo_corpus.py"),
            "--output_dir",
            str(out),
            "--seed",
            "0",
        ],
        check=True,
        capture_output=True,
    )
    assert _digest(out) == _digest(root)


def test_seed_changes_selection(demo, tmp_path):
    from speakllm_jax.data.demo_corpus import make_demo_corpus

    root, _ = demo
    other = tmp_path / "seed1"
    make_demo_corpus(other, seed=1)
    rel = "aishell/data_aishell/transcript/aishell_transcript_v0.8.txt"
    assert (other / rel).read_text("utf-8") != (root / rel).read_text("utf-8")


def test_aishell_layout(demo):
    root, _ = demo
    base = root / "aishell" / "data_aishell"
    wavs = sorted(base.glob("wav/*/*/*.wav"))
    assert {w.parent.parent.name for w in wavs} == {"train", "dev", "test"}
    ids = set()
    for w in wavs:
        assert re.fullmatch(r"BAC009S\d{4}W\d{4}", w.stem) and w.stem[6:11] == w.parent.name
        info = sf.info(str(w))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        ids.add(w.stem)
    lines = (base / "transcript" / "aishell_transcript_v0.8.txt").read_text("utf-8").splitlines()
    assert {ln.split()[0] for ln in lines} == ids
    for ln in lines:
        chars = ln.split()[1:]
        assert all(len(c) == 1 for c in chars)  # 以空白分隔的單字
        assert not re.search(r"[0-9，。？！]", "".join(chars))  # 數字已讀出、無標點


def test_commonvoice_layout(demo):
    root, _ = demo
    cv = root / "commonvoice" / CV_VERSION
    texts = []
    for locale in ("zh-TW", "en"):
        rows = {}
        for split in ("train", "dev", "test", "validated"):
            with (cv / locale / f"{split}.tsv").open(encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                assert tuple(reader.fieldnames) == CV_COLUMNS
                rows[split] = list(reader)
        assert rows["validated"] == rows["train"] + rows["dev"] + rows["test"]
        for r in rows["validated"]:
            clip = cv / locale / "clips" / r["path"]
            info = sf.info(str(clip))
            assert info.format == "MP3" and info.samplerate == 48000
            assert r["locale"] == locale and len(r["client_id"]) == 128
            texts.append(r["sentence"])
    joined = "".join(texts)
    assert re.search(r"[0-9]", joined) and re.search(r"[，。？！]", joined)
    assert re.search(r"[們這個會議臺台灣電腦]", joined)  # 繁體字
    assert {"zh", "en", "mixed"} <= {language_of(t) for t in texts}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if x.size else 0.0


def test_dialogue_annotations_match_audio(demo):
    root, _ = demo
    metas = sorted((root / "dialogues").glob("*.json"))
    assert metas
    kinds = set()
    for mp in metas:
        meta = json.loads(mp.read_text("utf-8"))
        wave, sr = sf.read(str(mp.with_suffix(".wav")), dtype="float32", always_2d=True)
        assert wave.shape[1] == 2 and sr == 16000
        assert meta["channel_roles"] == ["user", "assistant"]
        ch = {"user": wave[:, 0], "assistant": wave[:, 1]}

        def seg(role, s, e, ch=ch, sr=sr):
            return ch[role][int(s * sr) : int(e * sr)]

        for t in meta["turns"]:
            assert _rms(seg(t["speaker"], t["start"], t["end"])) > 0.02, t
        for ov in meta["overlaps"]:
            kinds.add(ov["kind"])
            # 重疊區間內兩個聲道都在說話
            assert _rms(seg("user", ov["start"], ov["end"])) > 0.01
            assert _rms(seg("assistant", ov["start"], ov["end"])) > 0.01
            if ov["kind"] == "barge_in":
                cut = next(t for t in meta["turns"] if t["kind"] == "interrupted")
                assert abs(cut["end"] - ov["end"]) < 1e-3 and ov["by"] == "user"
                # 助理在被搶話後停下：之後 0.3 秒只有底噪
                assert _rms(seg("assistant", cut["end"] + 0.02, cut["end"] + 0.3)) < 0.005
            else:
                host = next(
                    t
                    for t in meta["turns"]
                    if t["speaker"] == "assistant" and t["start"] <= ov["start"] < t["end"]
                )
                assert host["kind"] == "utterance" and host["end"] > ov["end"]  # 附和不打斷助理
        # 開場的停頓：第一個 turn 前兩個聲道都安靜
        first = min(t["start"] for t in meta["turns"])
        assert _rms(wave[: int((first - 0.05) * sr)]) < 0.005
    assert kinds == {"backchannel", "barge_in"}


def test_instructions_and_vad_truth(demo):
    root, _ = demo
    lines = (root / "instructions" / "instructions.jsonl").read_text("utf-8").splitlines()
    for ln in lines:
        rec = json.loads(ln)
        for k in ("instruction_audio", "response_audio"):
            assert sf.info(str(root / "instructions" / rec[k])).duration > 0.5
        assert rec["response_text"] and rec["instruction_text"]
    truth = json.loads((root / "vad" / "vad_truth.json").read_text("utf-8"))
    for rec in truth.values():
        wave, sr = sf.read(str(root / "vad" / rec["audio"]), dtype="float32")
        for s, e in rec["silences"]:
            assert _rms(wave[int(s * sr) + 1 : int(e * sr) - 1]) < 0.003
        for s, e in rec["speech"]:
            assert _rms(wave[int(s * sr) : int(e * sr)]) > 0.02


def test_emotion_labels_and_styles(demo):
    demo, _ = demo
    from speakllm_jax.data.demo_corpus import (
        ASSISTANT_VOICE,
        DEMO_EMOTIONS,
        EMOTION_STYLES,
        styled,
        synth,
    )

    metas = [json.loads(p.read_text("utf-8")) for p in sorted((demo / "dialogues").glob("*.json"))]
    lines = (demo / "instructions" / "instructions.jsonl").read_text("utf-8").splitlines()
    rows = [json.loads(x) for x in lines]
    labels = [m["emotion"] for m in metas] + [r["emotion"] for r in rows]
    # 對話接著指令，依序輪流五種情緒；回應風格與情緒相同。
    assert labels == [DEMO_EMOTIONS[i % len(DEMO_EMOTIONS)] for i in range(len(labels))]
    assert all(m["response_style"] == m["emotion"] for m in metas + rows)
    assert set(DEMO_EMOTIONS) == set(EMOTION_STYLES)
    # 風格真的改變聲音：sad 比 happy 慢（同一句更長）、音量小。
    happy = synth("今天天氣很好", *styled(ASSISTANT_VOICE, "happy"))
    sad = synth("今天天氣很好", *styled(ASSISTANT_VOICE, "sad"))
    assert len(sad) > 1.3 * len(happy)
    assert np.sqrt(np.mean(sad**2)) < np.sqrt(np.mean(happy**2))
    with pytest.raises(ValueError, match="calm"):
        styled(ASSISTANT_VOICE, "calm")
