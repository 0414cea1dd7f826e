"""隨專案附上的範例提問：16 kHz 單聲道、短小、與產生它們的指令一致。"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from speakllm_jax.data.demo_corpus import EXAMPLE_QUESTIONS, EXAMPLES_DIR, has_espeak

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(EXAMPLE_QUESTIONS))
def test_shipped_example_is_short_16k_mono(name):
    info = sf.info(REPO / EXAMPLES_DIR / name)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 1.0 < info.duration < 6.0  # 服務的單次會話上限是 28 秒
    assert (REPO / EXAMPLES_DIR / name).stat().st_size < 200_000


def test_examples_cover_zh_and_en():
    assert set(EXAMPLE_QUESTIONS) == {"question_zh.wav", "question_en.wav"}


@pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
def test_make_examples_cli_remakes_the_same_files(tmp_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "data/make_examples.py"), "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    for name in EXAMPLE_QUESTIONS:
        made, shipped = sf.read(tmp_path / name), sf.read(REPO / EXAMPLES_DIR / name)
        assert made[1] == shipped[1] == 16000
        # 同一版 espeak-ng 逐樣本相同；不同版本的合成長度可能略有差異。
        assert abs(len(made[0]) - len(shipped[0])) < 0.25 * len(shipped[0])
        assert name in res.stdout
