"""評估：由執行資料夾重建模型、ASR 錯誤率與 jiwer 一致、報表與圖寫出；全雙工評估（slow）。"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jiwer
import pytest

from speakllm_jax.eval.evaluate import evaluate_run
from speakllm_jax.text.normalize import normalize_for_scoring
from speakllm_jax.training.config_io import load_config
from speakllm_jax.training.loop import train


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("demo_eval")
    old = os.environ.get("SPEAKLLM_DEMO_DIR")
    os.environ["SPEAKLLM_DEMO_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SPEAKLLM_DEMO_DIR", None)
    else:
        os.environ["SPEAKLLM_DEMO_DIR"] = old


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
    _run("phase0", tmp_path, "--config.data.bucket_frames=(800,)", "--config.data.max_text_tokens=24")
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
    _run("phase2", tmp_path)
    report = evaluate_run(tmp_path, max_dialogues=1)
    m = report["duplex"]["metrics"]
    assert report["duplex"]["dialogues"] == 1
    assert "barge_in" in m and "backchannel" in m
    assert all(Path(p).exists() for p in report["plots"])
