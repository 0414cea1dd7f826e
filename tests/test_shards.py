"""離線鏈 → ArrayRecord 分片 → Grain：與 JSONL+WAV 路徑逐位元相同、重跑不重做、壞檔計數、
恢復與多行程分片（espeak-ng 合成的真實語音、真實 Qwen 詞表、本機 Ray 2 個工作者）。"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from speakllm_jax.audio.io import load_audio
from speakllm_jax.audio.vad import resample_split
from speakllm_jax.data.manifest import read_manifest, write_manifest
from speakllm_jax.data.offline_chain import ChainConfig, run_chain
from speakllm_jax.data.pipeline import build_pipeline
from speakllm_jax.data.shards import ShardReader
from speakllm_jax.text.manifest_text import normalize_manifest
from tests.pipeline_check import assert_same_batches, check_restore_mid_epoch, pipeline_cfg

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="需要 espeak-ng")

SENTENCES = [
    ("zh", "cmn", "孩子長大了，這條路的長度很重要。"),
    ("zh", "cmn", "我们重新开始，这件事很重要。"),
    ("mixed", "cmn", "我今天开meeting，用iPhone拍照。"),
    ("en", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("zh", "cmn", "明天的會議改到下午三點。"),
    ("en", "en-us", "Please send me the report by Friday."),
    ("zh", "cmn", "今天天气很好。"),
    ("en", "en-us", "Good morning everyone."),
    ("zh", "cmn", "请把电脑关掉。"),
]
NUM_SHARDS = 3


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """原始語料（22.05 kHz、繁體字、一個壞檔、一個缺檔）→ 兩條路徑：
    逐步 CLI 函式（normalize_manifest → resample_split）與離線鏈（本機 Ray 2 個工作者）。"""
    d = tmp_path_factory.mktemp("raw")
    rows = []
    for i, (lang, voice, text) in enumerate(SENTENCES):
        wav = d / f"u{i:02d}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)
        dur = len(load_audio(wav, target_sr=None)) / 22050
        rows.append(
            dict(
                id=f"u{i:02d}",
                audio=wav.name,
                offset=0.0,
                duration=round(dur, 4),
                sample_rate=22050,
                channels=1,
                text=text,
                language=lang,
                speaker="espeak",
                corpus="espeak",
                split="train",
            )
        )
    (d / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40)
    rows.insert(4, dict(rows[0], id="bad", audio="bad.wav"))
    rows.insert(2, dict(rows[0], id="gone", audio="gone.wav"))
    write_manifest(d / "raw.jsonl", rows)
    normalize_manifest(d / "raw.jsonl", d / "norm.jsonl", conversion="t2s")
    resample_split(d / "norm.jsonl", d / "rs", log=lambda s: None)
    out = d / "shards"
    summary = run_chain(
        d / "raw.jsonl", out, NUM_SHARDS, ChainConfig(), runner="local", num_workers=2, log=print
    )
    return {"dir": d, "jsonl": d / "rs" / "manifest.jsonl", "shards": out, "summary": summary}


def _drop_local(row):
    return {k: v for k, v in row.items() if k not in ("audio", "source_audio", "shard_record")}


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def test_shards_hold_the_jsonl_path_rows_and_audio(chain):
    s = chain["summary"]
    assert s["processed"] == NUM_SHARDS and s["reused"] == 0
    # 壞檔與缺檔都在略過報告裡，其他都寫出
    assert s["skipped"]["by_reason"] == {"corrupt": 1, "missing": 1}
    skipped = [json.loads(x) for x in (chain["shards"] / "manifest.skipped.jsonl").open()]
    assert sorted(x["key"] for x in skipped) == ["bad", "gone"]
    ref = read_manifest(chain["jsonl"])
    got = read_manifest(chain["shards"] / "manifest.jsonl")
    assert [_drop_local(r) for r in got] == [_drop_local(r) for r in ref]
    assert got[0]["text"] == "孩子长大了，这条路的长度很重要。"  # t2s
    reader = ShardReader(chain["shards"])
    assert len(reader) == len(ref) == len(SENTENCES)
    index = json.loads((chain["shards"] / "index.json").read_text())
    assert len(index["shards"]) == NUM_SHARDS and sum(x["records"] for x in index["shards"]) == 9
    for i, r in enumerate(ref):
        rec = reader[i]
        assert rec["row"]["id"] == r["id"] and rec["sample_rate"] == 16000
        wav = load_audio(chain["jsonl"].parent / r["audio"], target_sr=None)
        np.testing.assert_array_equal(rec["wave"][:, 0], wav)
        han = [c for c in r["text"] if "\u4e00" <= c <= "\u9fff"]
        assert int((rec["tones_array"] > 0).sum()) == len(han)


def test_rerun_reuses_finished_shards_byte_identical(chain, tmp_path):
    before = _files(chain["shards"])
    again = run_chain(
        chain["dir"] / "raw.jsonl", chain["shards"], NUM_SHARDS, runner="inline", log=print
    )
    assert again["processed"] == 0 and again["reused"] == NUM_SHARDS
    assert _files(chain["shards"]) == before
    # 從頭重做（另一個資料夾、依序執行）也得到逐位元相同的分片
    fresh = run_chain(
        chain["dir"] / "raw.jsonl", tmp_path / "o", NUM_SHARDS, runner="inline", log=print
    )
    assert fresh["processed"] == NUM_SHARDS
    after = _files(tmp_path / "o")
    assert {k: v for k, v in after.items() if k.endswith(".array_record")} == {
        k: v for k, v in before.items() if k.endswith(".array_record")
    }
    # 改一個分片的輸入：只重做那一片
    raw = read_manifest(chain["dir"] / "raw.jsonl")
    raw[-1]["text"] = "请把电脑关掉吧。"
    write_manifest(chain["dir"] / "raw2.jsonl", raw)
    part = run_chain(chain["dir"] / "raw2.jsonl", tmp_path / "o", NUM_SHARDS, runner="inline")
    assert part["processed"] == 1 and part["reused"] == NUM_SHARDS - 1


def _batches(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n and len(out) == n:
            break
    return out


@pytest.mark.parametrize("sync", [False, True])
def test_grain_over_shards_equals_jsonl_batches(chain, tok, sync):
    cfg = pipeline_cfg(num_epochs=2, seed=5, sync_buckets=sync)
    shards = f"shards:{chain['shards']}"
    for p, n in ((0, 1), (0, 2), (1, 2)):
        ref = list(build_pipeline(chain["jsonl"], cfg, tok, p, n).iterator())
        got = list(build_pipeline(shards, cfg, tok, p, n).iterator())
        assert_same_batches(ref, got)
        assert sum(int(b["example_mask"].sum()) for b in got) > 0


def test_two_processes_read_disjoint_records_covering_the_set(chain, tok):
    shards = f"shards:{chain['shards']}"
    seen = []
    for p in range(2):
        pipe = build_pipeline(shards, pipeline_cfg(sync_buckets=False), tok, p, 2)
        seen.append(
            {str(u) for b in pipe.iterator() for u, m in zip(b["utt_id"], b["example_mask"]) if m}
        )
    ids = {r["id"] for r in read_manifest(chain["shards"] / "manifest.jsonl")}
    assert not (seen[0] & seen[1]) and seen[0] | seen[1] == ids


@pytest.mark.parametrize("sync", [False, True])
def test_restore_state_on_shards_continues_identically(chain, tok, sync):
    shards = f"shards:{chain['shards']}"
    check_restore_mid_epoch(
        shards, pipeline_cfg(num_epochs=None, seed=3, sync_buckets=sync), tok, 5
    )


def test_cli_flags_run_the_chain_and_reject_bad_runner(chain, tmp_path):
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    raw = str(chain["dir"] / "raw.jsonl")
    cmd = [sys.executable, str(repo / "data/resample_split.py"), "--manifest", raw]
    out = tmp_path / "cli"
    args = ["--output_dir", str(out), "--shards", "2", "--runner", "inline", "--conversion", "t2s"]
    r = subprocess.run(cmd + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "index.json").read_text())["records"] == len(SENTENCES)
    assert "--config.data.source=shards:" in r.stdout
    bad = subprocess.run(
        cmd + ["--output_dir", str(out), "--shards", "2", "--runner", "spark"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("錯誤：") and "--runner" in bad.stderr


def test_speech_codes_in_shards_equal_extract_speech_tokens(chain, tmp_path):
    """工作者內抽的 Voila 碼與逐句 CLI 路徑（`extract_speech_tokens` 讀同樣的 16 kHz WAV）相同。"""
    from export.tokenizers.extract import extract_speech_tokens
    from export.tokenizers.voila import make_demo_voila_tokenizer
    from speakllm_jax.data.speech_tokens import load_codes

    ckpt = make_demo_voila_tokenizer(tmp_path / "voila")
    cfg = ChainConfig(
        vad=False,
        tokenizer="voila",
        checkpoint=str(ckpt),
        token_batch_size=1,
        tokenizer_loader="export.tokenizers.extract:load_speech_tokenizer",
    )
    out = tmp_path / "coded"
    run_chain(chain["jsonl"], out, 2, cfg, runner="inline", log=print)
    extract_speech_tokens(
        out / "manifest.jsonl", tmp_path / "codes", str(ckpt), batch_size=1, progress=False
    )
    ref = load_codes(tmp_path / "codes")
    reader = ShardReader(out)
    rows = read_manifest(out / "manifest.jsonl")
    assert len(rows) == len(ref) == len(SENTENCES)
    for r in rows:
        got = reader[r["shard_record"]]["codes_arrays"]["voila"]
        assert got.shape[0] == 4
        np.testing.assert_array_equal(got, ref[r["id"]])


def test_split_filter_and_missing_split_error(chain):
    from speakllm_jax.cli import UserFileError
    from speakllm_jax.data.pipeline import source_rows

    d = chain["shards"]
    assert len(source_rows(f"shards:{d}#train")) == len(source_rows(f"shards:{d}")) == 9
    with pytest.raises(UserFileError, match="split='test'"):
        source_rows(f"shards:{d}#test")
    with pytest.raises(UserFileError, match="index.json"):
        source_rows(f"shards:{d}/missing")
