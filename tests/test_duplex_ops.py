"""全雙工逐列 op 與批次綱要。

組合後的 op 產生的批次與重構前的 `DuplexTransform` 逐位元相同：期望值由舊程式在同樣的兩段真實
示範對話（`crop_dialogues`）與同樣的亂數語音碼上算出，存成 `tests/data/duplex_batch_golden.npz`
（梅爾只存每 16 框取一框與總和）。另測 op 規格的解析與錯誤、略過原因，以及綱要同時給出任務的
邏輯軸與規劃器的抽象輸入。
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from speakllm_jax.cli import UserValueError
from speakllm_jax.data.duplex import DUPLEX_BATCH, DUPLEX_TRAIN_OPS
from speakllm_jax.data.ops import OPS, compose, parse_ops
from speakllm_jax.labels import EMOTIONS

GOLDEN = Path(__file__).parent / "data" / "duplex_batch_golden.npz"


@pytest.fixture(scope="module")
def setup(crop_dialogues, qwen_tokenizer_dir):
    from configs.phase3_emotion import get_config
    from speakllm_jax.training.tasks.duplex import DuplexTask

    cfg = get_config("tiny")
    cfg.model.tokenizer_path = str(qwen_tokenizer_dir)
    cfg.data.max_frames = 232
    task = DuplexTask(cfg)
    rows = [dict(r) for r in crop_dialogues[:2]]
    rows[1]["emotion"] = EMOTIONS[2]
    rows[0]["response_style"] = EMOTIONS[1]
    q = task.model_cfg.speech.num_codebooks
    rng = np.random.default_rng(0)
    codes = {
        r["id"]: rng.integers(0, 2048, (q, math.ceil(r["duration"] / 0.04))).astype(np.int16)
        for r in rows
    }
    return cfg, task, rows, codes


def test_batch_identical_to_pre_refactor_transform(setup):
    _, task, rows, codes = setup
    row_ops = task.row_ops(codes)
    assert row_ops.names == DUPLEX_TRAIN_OPS.split("|")
    golden = np.load(GOLDEN)
    for i, row in enumerate(rows):
        x = row_ops(row)
        assert list(x) == list(DUPLEX_BATCH.names)
        for k, v in x.items():
            if k == "mel":
                np.testing.assert_array_equal(v[:, ::16], golden[f"{i}/mel_sample"])
                assert v.astype(np.float64).sum() == golden[f"{i}/mel_sum"]
                assert v.shape == (80, 4 * 232) and v.dtype == np.float32
                continue
            g = golden[f"{i}/{k}"]
            assert v.dtype == g.dtype and v.shape == g.shape, k
            np.testing.assert_array_equal(v, g, err_msg=k)
    assert row_ops.skips.total == 0


def test_skips_counted_by_reason(setup, crop_dialogues, capsys):
    _, task, rows, codes = setup
    row_ops = task.row_ops(codes)
    bad = [
        crop_dialogues[2],  # 44 秒 > 232 幀
        dict(rows[0], id="bademo", emotion="furious"),
        {k: v for k, v in rows[0].items() if k != "turns"},
    ]
    assert [row_ops(r) for r in bad] == [None, None, None]
    assert row_ops.skips.as_dict() == {"bad_emotion": 1, "bad_row": 1, "too_long": 1}
    out = capsys.readouterr().out
    assert "略過 bademo: 未知的情緒標籤 'furious'" in out and "缺少欄位 'turns'" in out


def test_ops_spec_from_config(setup):
    from speakllm_jax.training.tasks.duplex import DuplexTask

    cfg, task, rows, codes = setup
    base = task.row_ops(codes)(rows[0])
    longer = cfg.copy_and_resolve_references()
    longer.data.ops = DUPLEX_TRAIN_OPS.replace("pad_frames", "pad_frames(max_frames=240)")
    x = DuplexTask(longer).row_ops(codes)(rows[0])
    assert x["frame_mask"].shape == (240,) and x["mel"].shape == (80, 960)
    n = int(base["frame_mask"].sum())
    for k in ("text_target", "tones_target", "codes_target", "turn_target", "code_weight"):
        np.testing.assert_array_equal(x[k][:232], base[k], err_msg=k)
    assert (x["text_target"][n:] == task.pad_id).all()
    np.testing.assert_array_equal(x["mel"][:, : 4 * n], base["mel"][:, : 4 * n])
    assert x["mel_mask"].sum() == base["mel_mask"].sum()

    # 去掉 text_targets：綱要欄位缺了，是設定錯誤而不是靜默產生別的批次。
    broken = cfg.copy_and_resolve_references()
    broken.data.ops = DUPLEX_TRAIN_OPS.replace("text_targets|", "")
    with pytest.raises(KeyError, match="text_target"):
        DuplexTask(broken).row_ops(codes)(rows[0])

    unknown = cfg.copy_and_resolve_references()
    unknown.data.ops = "load_audio|nope"
    with pytest.raises(
        UserValueError, match="^--config.data.ops：未知的 op 'nope'.*interleave_text"
    ):
        DuplexTask(unknown)


def test_parse_ops():
    assert parse_ops("a | b(k=1, s='x', t=(1, 2))") == [
        ("a", {}),
        ("b", {"k": 1, "s": "x", "t": (1, 2)}),
    ]
    assert parse_ops(["a", "b(k=None)"]) == [("a", {}), ("b", {"k": None})]
    for bad in ("b(1)", "b(k=x)", "b(", "a.b"):
        with pytest.raises(ValueError, match="data.ops"):
            parse_ops(bad)
    with pytest.raises(ValueError, match="pad_frames：參數不對"):
        compose("pad_frames(frames=3)", None)
    assert {"load_audio", "log_mel", "pad_frames", "interleave_text", "tone_targets"} <= set(OPS)


def test_schema_drives_planner_and_axes(setup, qwen_tokenizer_dir):
    from configs.phase0_connector import get_config
    from speakllm_jax.training.planner import abstract_batch
    from speakllm_jax.training.tasks.asr import AsrConnectorTask

    _, task, rows, codes = setup
    row_ops = task.row_ops(codes)
    batch = {k: np.stack([row_ops(r)[k] for r in rows]) for k in DUPLEX_BATCH.names}
    abstract = abstract_batch(task, 2, None, None)
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in batch.items()
    }
    assert task.batch_axes() == {k: ("batch",) + (None,) * (v.ndim - 1) for k, v in batch.items()}

    cfg = get_config("tiny")
    cfg.model.tokenizer_path = str(qwen_tokenizer_dir)
    asr = AsrConnectorTask(cfg)
    shapes = {k: tuple(v.shape) for k, v in abstract_batch(asr, 3, 400, 20).items()}
    assert shapes == {
        "mel": (3, 80, 400),
        "mel_mask": (3, 400),
        "text_ids": (3, 20),
        "text_mask": (3, 20),
    }
    frames = int(round(cfg.data.max_audio_seconds * 100)) // 4 * 4
    assert abstract_batch(asr, 1, None, None)["mel"].shape == (1, 80, frames)
    assert asr.batch_axes()["mel"] == ("batch", None, None)


def test_duplex_iterator_resumes_exactly(setup, crop_dialogues, tmp_path):
    """`DuplexTask.make_data` 走 op 組合：存下迭代器狀態後重建、恢復，之後的批次與略過計數不變。"""
    from speakllm_jax.data.manifest import write_manifest
    from speakllm_jax.training.tasks.duplex import DuplexTask

    cfg, _, rows, _ = setup
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [*rows, crop_dialogues[2], dict(rows[0], id="x", emotion="furious")])
    c = cfg.copy_and_resolve_references()
    c.data.train_manifests = str(manifest)
    c.train.batch_size = 2
    it = DuplexTask(c).make_data(0, 1)
    next(it)
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    skipped = it.skip_report()
    assert skipped.get("too_long", 0) >= 1 and skipped.get("bad_emotion", 0) >= 1

    again = DuplexTask(c).make_data(0, 1)
    again.set_state(state)
    for a, b in zip(after, [next(again) for _ in range(2)]):
        assert sorted(a) == sorted(DUPLEX_BATCH.names)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert again.skip_report() == skipped
