"""評估：由執行資料夾重建模型、ASR 錯誤率與 jiwer 一致、報表與圖寫出；全雙工評估（slow）。"""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pytest

from speakllm_jax.config import load_config
from speakllm_jax.eval.evaluate import evaluate_run
from speakllm_jax.text.normalize import normalize_for_scoring
from speakllm_jax.training.loop import train


def _run(phase: str, workdir: Path, *extra: str) -> None:
    cfg = load_config(
        phase,
        [
            "--config.train.steps=2",
            "--config.train.batch_size=2",
            "--config.mesh.data=1",
            "--config.logging.tensorboard=false",
            *extra,
        ],
    )
    train(cfg, workdir, progress=False)


def test_asr_report_matches_jiwer(demo_dir: Path, tmp_path: Path) -> None:
    _run(
        "phase0", tmp_path, "--config.data.bucket_frames=(800,)", "--config.data.max_text_tokens=24"
    )
    report = evaluate_run(tmp_path, max_utts=3)
    asr = report["asr"]
    assert report["step"] == 2 and asr["utterances"] == 3
    saved = json.loads((tmp_path / "eval" / "step_2" / "report.json").read_text())
    assert saved["asr"]["mer"] == pytest.approx(asr["mer"])
    assert Path(report["plots"][0]).exists()
    # 純中文句子：MER 等於把每個漢字當一個詞時 jiwer 的 WER。
    zh = [it for it in asr["items"] if it["language"] == "zh"]
    if zh:

        def chars(s: str) -> str:
            return " ".join(normalize_for_scoring(s).replace(" ", "")) or "<empty>"

        ref = [chars(it["ref"]) for it in zh]
        hyp = [chars(it["hyp"]) for it in zh]
        out = jiwer.process_words(ref, hyp)
        errors = out.substitutions + out.deletions + out.insertions
        n = sum(len(r.split()) for r in ref)
        assert asr["cer"] == pytest.approx(errors / n)


@pytest.mark.slow
def test_duplex_report(demo_dir: Path, tmp_path: Path) -> None:
    # 第 3 階段的模型有情緒頭：報表同時有輪替指標與情緒準確率（示範對話帶情緒標籤）。
    _run("phase3", tmp_path)
    report = evaluate_run(tmp_path, max_dialogues=2)
    m = report["duplex"]["metrics"]
    assert report["duplex"]["dialogues"] == 2
    assert "interruption" in m and "backchannel" in m and "pause" in m
    # 聲調頭的教師強制正確率：同樣兩段對話，示範助理文字有漢字，所以有計分位置。
    tone = report["duplex"]["tone_head_accuracy"]
    assert tone["dialogues"] == 2 and tone["scored"] > 0
    assert tone["scored"] == sum(v["scored"] for v in tone["per_tone"].values())
    assert 0.0 <= tone["accuracy"] <= 1.0
    emo = report["duplex"]["emotion"]
    assert emo["segments"] == 2 and sum(map(sum, emo["confusion"])) == 2
    # 示範語料的前兩段對話依序是 neutral、happy。
    assert [emo["per_class"][c]["count"] for c in ("neutral", "happy")] == [1, 1]
    assert 0.0 <= emo["accuracy"] <= 1.0
    assert any(p.endswith("emotion_confusion.png") for p in report["plots"])
    assert all(Path(p).exists() for p in report["plots"])


def test_emotion_report_on_hand_made_labels() -> None:
    from speakllm_jax.eval.emotion import emotion_report

    classes = ("neutral", "happy", "sad")
    r = emotion_report(
        ["happy", "happy", "sad", "neutral"], ["happy", "sad", "sad", "happy"], classes
    )
    assert r["accuracy"] == 0.5
    assert r["confusion"] == [[0, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["per_class"]["happy"] == {"count": 2, "recall": 0.5}
    assert r["per_class"]["neutral"]["recall"] == 0.0
    with pytest.raises(ValueError, match="calm"):
        emotion_report(["calm"], ["happy"], classes)
