"""Grain 輸入管線：以 espeak-ng 合成的真實語音與真實 Qwen 詞表測試分片、恢復、靜態形狀、聲調與壞資料。"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from speakllm_jax.audio.io import SkipCounter, load_audio, write_audio
from speakllm_jax.data.manifest import write_manifest
from speakllm_jax.data.pipeline import PipelineConfig, build_pipeline, make_iterator
from speakllm_jax.text.codeswitch import is_han
from speakllm_jax.text.tones import char_tones
from tests.pipeline_check import BOUNDARIES, check_restore_mid_epoch, pipeline_cfg

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="需要 espeak-ng")

SENTENCES = [
    ("zh", "cmn", "孩子长大了，这条路的长度很重要。"),
    ("zh", "cmn", "我们重新开始，这件事很重要。"),
    ("zh", "cmn", "我去银行取钱，他在路上行走。"),
    ("mixed", "cmn", "我今天开meeting，用iPhone拍照。"),
    ("zh", "cmn", "明天的会议改到下午三点。"),
    ("en", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("en", "en-us", "Please send me the report by Friday."),
    ("zh", "cmn", "今天天气很好。"),
    ("mixed", "cmn", "这个project的deadline是下周。"),
    ("en", "en-us", "Good morning everyone."),
    ("zh", "cmn", "请把电脑关掉。"),
    ("zh", "cmn", "你好。"),
]


def _espeak(path, voice, text):
    subprocess.run(
        ["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True
    )


def _row(rid, audio, text, lang, duration, sr=22050):
    return {
        "id": rid,
        "audio": audio,
        "offset": 0.0,
        "duration": duration,
        "sample_rate": sr,
        "channels": 1,
        "text": text,
        "language": lang,
        "speaker": "espeak",
        "corpus": "espeak",
        "split": "train",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, (lang, voice, text) in enumerate(SENTENCES):
        wav = d / f"u{i:02d}.wav"
        _espeak(wav, voice, text)
        dur = len(load_audio(wav, target_sr=None)) / 22050
        rows.append(_row(f"u{i:02d}", wav.name, text, lang, dur))
    write_manifest(d / "train.jsonl", rows)
    return d / "train.jsonl", rows


def _valid_ids(batch):
    return [str(u) for u, m in zip(batch["utt_id"], batch["example_mask"]) if m]


def _epoch_ids(pipe, rows, epoch, p):
    """本行程在 epoch 中應讀到的列 id（依來源的排列或全域計畫）。"""
    src = pipe.source
    if hasattr(src, "shard_rows"):
        return [rows[i]["id"] for i in src.shard_rows(epoch)]
    b = src.batch_size
    return [
        rows[r]["id"]
        for _, members in src.epoch_plan(epoch)
        for r in members[p * b : (p + 1) * b]
        if r >= 0
    ]


@pytest.mark.parametrize("sync", [False, True])
def test_epoch_visits_each_example_once_per_process(corpus, tok, sync):
    from collections import Counter

    manifest, rows = corpus
    per_proc, shapes = [], []
    for p in range(2):
        cfg = pipeline_cfg(num_epochs=2, sync_buckets=sync)
        pipe = build_pipeline(manifest, cfg, tok, process_index=p, process_count=2)
        batches = list(pipe.iterator())
        shapes.append([b["mel"].shape for b in batches])
        seen = Counter(u for b in batches for u in _valid_ids(b))
        epochs = [_epoch_ids(pipe, rows, e, p) for e in range(2)]
        # 兩個 epoch 讀到的正好是兩個 epoch 的分片，各一次
        assert seen == Counter(epochs[0]) + Counter(epochs[1])
        assert all(len(set(ep)) == len(ep) for ep in epochs)
        per_proc.append([set(ep) for ep in epochs])
    all_ids = {r["id"] for r in rows}
    for e in range(2):
        a, b = per_proc[0][e], per_proc[1][e]
        assert a | b == all_ids and not (a & b)
    # 每個 epoch 的切片不同（洗牌依 epoch 改變）
    assert per_proc[0][0] != per_proc[0][1]
    if sync:
        # 全域計畫：兩個行程步數相同、每一步桶長相同（多主機組全域批次的前提）
        assert shapes[0] == shapes[1]


@pytest.mark.parametrize("sync", [False, True])
def test_restore_state_mid_epoch_continues_identically(corpus, tok, sync):
    manifest, _ = corpus
    check_restore_mid_epoch(
        manifest, pipeline_cfg(num_epochs=None, seed=3, sync_buckets=sync), tok, 6
    )


def test_static_shapes_and_whisper_padding(corpus, tok):
    from transformers import WhisperFeatureExtractor

    manifest, rows = corpus
    cfg = pipeline_cfg(drop_remainder=False)
    batches = list(build_pipeline(manifest, cfg, tok, 0, 1).iterator())
    assert sum(int(b["example_mask"].sum()) for b in batches) == len(rows)
    fe = WhisperFeatureExtractor(feature_size=80)
    by_id = {r["id"]: r for r in rows}
    checked = 0
    for b in batches:
        t = b["mel"].shape[2]
        assert t in BOUNDARIES
        assert b["mel"].shape == (2, 80, t) and b["mel"].dtype == np.float32
        assert b["mel_mask"].shape == (2, t)
        assert b["text_ids"].shape == (2, 48) and b["tones"].shape == (2, 48, 4)
        assert b["lang_ids"].shape == b["text_mask"].shape == (2, 48)
        for i in np.flatnonzero(b["example_mask"]):
            n = int(b["mel_lengths"][i])
            assert n <= t and (t == BOUNDARIES[0] or n > BOUNDARIES[BOUNDARIES.index(t) - 1])
            assert b["mel_mask"][i].sum() == n
            assert b["text_ids"][i, b["text_lengths"][i] - 1] == tok.eos_id
            if checked < 3:
                # 補齊到桶長的特徵等於 Whisper 對補零到同長度的音訊算出的特徵（除交界兩框）
                row = by_id[str(b["utt_id"][i])]
                audio = load_audio(manifest.parent / row["audio"], target_sr=16000)
                ref = fe(
                    audio,
                    sampling_rate=16000,
                    padding="max_length",
                    max_length=t * 160,
                    truncation=True,
                    return_tensors="np",
                )["input_features"][0]
                np.testing.assert_allclose(b["mel"][i, :, : n - 1], ref[:, : n - 1], atol=2e-3)
                np.testing.assert_allclose(b["mel"][i, :, n + 2 :], ref[:, n + 2 :], atol=2e-3)
                checked += 1
        # 填充列全為遮罩
        for i in np.flatnonzero(~b["example_mask"]):
            assert not b["mel_mask"][i].any() and not b["text_mask"][i].any()
    assert checked == 3


def test_tones_and_languages_align_to_real_qwen_tokens(corpus, tok):
    manifest, rows = corpus
    by_id = {r["id"]: r for r in rows}
    cfg = pipeline_cfg()
    found = {}
    for b in build_pipeline(manifest, cfg, tok, 0, 1).iterator():
        for i in np.flatnonzero(b["example_mask"]):
            text = by_id[str(b["utt_id"][i])]["text"]
            n = int(b["text_lengths"][i]) - 1  # 去掉 eos
            ids = b["text_ids"][i, :n]
            assert tok.decode(ids) == text
            tb = tok.token_bytes(ids)
            ct = char_tones(text)
            pos = 0
            char_at = []
            for ch_i, ch in enumerate(text):
                char_at += [ch_i] * len(ch.encode())
            for j, raw in enumerate(tb):
                # 該符號擁有的漢字（最後一個位元組落在此符號內）
                owned = [
                    char_at[p]
                    for p in range(pos, pos + len(raw))
                    if is_han(text[char_at[p]])
                    and (p + 1 == len(char_at) or char_at[p + 1] != char_at[p])
                ]
                tones = b["tones"][i, j]
                assert tones[: len(owned)].tolist() == [ct[c] for c in owned]
                assert not tones[len(owned) :].any()
                piece = raw.decode("utf-8", errors="ignore").strip()
                if piece and all(is_han(c) for c in piece):
                    assert b["lang_ids"][i, j] == 1
                elif piece.isascii() and piece.isalpha():
                    assert b["lang_ids"][i, j] == 2
                for c in owned:
                    found[(text, c)] = ct[c]
                pos += len(raw)
    t1, t2 = SENTENCES[0][2], SENTENCES[1][2]
    # 破音字：长大 zhǎng(3) 與 长度 cháng(2)；重要 zhòng(4) 與 重新 chóng(2)
    assert found[(t1, t1.index("长大"))] == 3 and found[(t1, t1.index("长度"))] == 2
    assert found[(t2, t2.index("重要"))] == 4 and found[(t2, t2.index("重新"))] == 2
    assert found[(t1, t1.index("重要"))] == 4


def test_codeswitch_augmentation_is_deterministic(corpus, tok):
    manifest, rows = corpus
    cfg = pipeline_cfg(codeswitch_prob=1.0, codeswitch_word_prob=1.0, seed=7)

    def texts(c):
        out = {}
        for b in build_pipeline(manifest, c, tok, 0, 1).iterator():
            for i in np.flatnonzero(b["example_mask"]):
                ids = b["text_ids"][i, : b["text_lengths"][i] - 1]
                out[str(b["utt_id"][i])] = (
                    tok.decode(ids),
                    int(b["language"][i]),
                    b["lang_ids"][i].tolist(),
                )
        return out

    a, b = texts(cfg), texts(cfg)
    assert a == b
    # 「会议」「电脑」被換成英文，整句語言變成 mixed（3），英文符號的語言編號為 2
    assert "meeting" in a["u04"][0] and "会议" not in a["u04"][0] and a["u04"][1] == 3
    assert "computer" in a["u10"][0] and 2 in a["u10"][2]
    # 沒有詞典詞的句子不變
    assert a["u07"][0] == rows[7]["text"]
    plain = texts(pipeline_cfg())
    assert plain["u04"][0] == rows[4]["text"] and plain["u04"][1] == 1


@pytest.mark.parametrize("sync", [False, True])
def test_broken_files_are_skipped_and_counted(tmp_path, corpus, tok, sync):
    manifest, rows = corpus
    d = tmp_path
    good = []
    for r in rows[:4]:
        shutil.copy(manifest.parent / r["audio"], d / r["audio"])
        good.append(dict(r))
    (d / "empty.wav").write_bytes(b"")
    data = (manifest.parent / rows[0]["audio"]).read_bytes()
    (d / "truncated.wav").write_bytes(data[: len(data) // 3])
    (d / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    # 8 kHz 的檔案：管線會重取樣，因此不算壞資料
    a8 = load_audio(manifest.parent / rows[7]["audio"], target_sr=8000)
    write_audio(d / "rate8k.wav", a8, 8000)
    rng = np.random.default_rng(1)
    write_audio(d / "huge.wav", 0.1 * rng.standard_normal(16000 * 9).astype(np.float32), 16000)
    bad = [
        _row("b_empty", "empty.wav", "你好", "zh", 1.0),
        _row("b_trunc", "truncated.wav", "你好", "zh", 1.0),
        _row("b_random", "random.wav", "你好", "zh", 1.0),
        _row("b_missing", "missing.wav", "你好", "zh", 1.0),
        _row("b_huge", "huge.wav", "很长的句子", "zh", 9.0, sr=16000),
        _row("b_notext", rows[0]["audio"], "   ", "zh", rows[0]["duration"]),
        _row("b_surrogate", rows[1]["audio"], "坏\udcff字", "zh", rows[1]["duration"]),
    ]
    write_audio(d / "blip.wav", 0.1 * rng.standard_normal(800).astype(np.float32), 16000)
    bad.append(_row("b_short", "blip.wav", "嗯", "zh", 0.05, sr=16000))
    bad.append(dict(_row("b_textint", rows[2]["audio"], "x", "zh", 1.0), text=5))
    no_audio = _row("b_noaudio", rows[2]["audio"], "你好", "zh", 1.0)
    del no_audio["audio"]
    bad.append(no_audio)
    ok8k = _row("ok_8k", "rate8k.wav", rows[7]["text"], "zh", len(a8) / 8000, sr=8000)
    lines = [json.dumps(r) for r in good + bad + [ok8k]]  # 孤立代理字元以 \u 跳脫寫入
    with (d / "m.jsonl").open("wb") as f:
        for ln in lines:
            f.write(ln.encode("utf-8") + b"\n")
        f.write(b'{"id": "b_latin1", "text": "caf\xe9"}\n')  # 非 UTF-8 的一行
    pipe = build_pipeline(
        d / "m.jsonl", pipeline_cfg(max_seconds=6.0, sync_buckets=sync), tok, 0, 1
    )
    stats = SkipCounter(keep_items=False).update(pipe.manifest_skips)
    seen = []
    for b in pipe.iterator():
        stats.update(b)
        seen += _valid_ids(b)
    assert sorted(seen) == sorted([r["id"] for r in good] + ["ok_8k"])
    assert stats.as_dict() == {
        "bad_row": 2,
        "bad_text": 1,
        "corrupt": 1,
        "empty": 1,
        "empty_text": 1,
        "missing": 1,
        "non_utf8": 1,
        "too_long": 1,
        "too_short": 1,
        "truncated": 1,
    }


def test_orbax_checkpoint_through_grain_handler(tmp_path, corpus, tok):
    import grain
    import orbax.checkpoint as ocp

    manifest, _ = corpus
    cfg = pipeline_cfg(num_epochs=None, seed=5)
    it = make_iterator(manifest, cfg, tok, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    reference = [next(it) for _ in range(3)]
    fresh = make_iterator(manifest, cfg, tok, process_index=0, process_count=1)
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for a in reference:
        b = next(fresh)
        np.testing.assert_array_equal(a["utt_id"], b["utt_id"])
        np.testing.assert_array_equal(a["mel"], b["mel"])
        np.testing.assert_array_equal(a["tones"], b["tones"])


def test_drop_remainder_counts_dropped_examples(corpus, tok):
    manifest, rows = corpus
    stats = SkipCounter(keep_items=False)
    valid = 0
    batches = list(
        build_pipeline(
            manifest, pipeline_cfg(drop_remainder=True, batch_size=3), tok, 0, 1
        ).iterator()
    )
    for b in batches:
        stats.update(b)
        valid += int(b["example_mask"].sum())
        assert b["example_mask"].all() or not b["example_mask"].any()
    dropped = stats.as_dict().get("dropped_remainder", 0)
    assert dropped > 0 and valid + dropped == len(rows)
    # 最後一批全遮罩，帶著丟棄數，計數不遺失
    assert not batches[-1]["example_mask"].any() and batches[-1]["skipped"]


@pytest.mark.slow
@pytest.mark.parametrize("sync", [False, True])
def test_multiprocess_prefetch_resumes_exactly(corpus, tok, sync):
    manifest, _ = corpus
    cfg = pipeline_cfg(num_epochs=None, workers=2, sync_buckets=sync)
    it = make_iterator(manifest, cfg, tok, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    reference = [next(it) for _ in range(4)]
    restored = make_iterator(manifest, cfg, tok, process_index=0, process_count=1, state=state)
    again = [next(restored) for _ in range(4)]
    for a, b in zip(reference, again):
        np.testing.assert_array_equal(a["mel"], b["mel"])
        np.testing.assert_array_equal(a["utt_id"], b["utt_id"])
    it.close()
    restored.close()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="bucket_boundaries"):
        PipelineConfig(bucket_boundaries=(500, 250)).validate()
    with pytest.raises(ValueError, match="frame_multiple"):
        PipelineConfig(bucket_boundaries=(501,)).validate()
    with pytest.raises(ValueError, match="nope"):
        PipelineConfig.from_mapping({"nope": 1})
