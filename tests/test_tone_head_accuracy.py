"""全雙工評估的聲調頭正確率：教師強制前向、只計目標 > 0、目標一律聲調感知（不需訓練）。"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from speakllm_jax.config import load_config
from speakllm_jax.eval.evaluate import tone_head_accuracy
from speakllm_jax.eval.tone_accuracy import tone_head_summary
from speakllm_jax.labels import NUM_TONES
from speakllm_jax.text.codeswitch import is_han
from speakllm_jax.text.normalize import normalize_zh
from speakllm_jax.text.tones import char_tones
from speakllm_jax.training.tasks import get_task

ZH_REPLY = "今天天氣很好，我們去公園吧"


def _row(path: Path, rid: str, reply: str) -> dict:
    """兩秒半的雙聲道對話：使用者先說，助理接著回答 `reply`。"""
    rng = np.random.default_rng(0)
    sf.write(path, 0.05 * rng.standard_normal((40000, 2)).astype(np.float32), 16000)
    return {
        "id": rid,
        "audio": str(path),
        "turns": [
            {"speaker": "user", "start": 0.0, "end": 0.8, "text": "你好嗎"},
            {"speaker": "assistant", "start": 1.0, "end": 2.4, "text": reply},
        ],
        "overlaps": [],
    }


@pytest.fixture(scope="module")
def tone3_run():
    """聲調頭權重為 0、偏置偏向第 3 聲的小模型，設定為 tone_aware=False 的消融。"""
    cfg = load_config(
        "phase2", ["--config.data.max_frames=64", "--config.research.tone_aware=false"]
    )
    task = get_task(cfg)
    model = task.build_model(nnx.Rngs(0))
    head = model.tone_head
    head.kernel.value = jnp.zeros_like(head.kernel.value)
    bias = np.zeros((int(cfg.model.max_chars_per_token), NUM_TONES), np.float32)
    bias[:, 3] = 10.0
    head.bias.value = jnp.asarray(bias.reshape(-1))
    return cfg, task, model


def test_tone_head_accuracy_known_prediction(tone3_run, tmp_path: Path) -> None:
    cfg, task, model = tone3_run
    rows = [
        _row(tmp_path / "zh.wav", "zh", ZH_REPLY),
        _row(tmp_path / "en.wav", "en", "okay, sounds good"),
    ]
    out = tone_head_accuracy(cfg, task, model, rows)
    # 獨立算出的參考：助理文字（繁轉簡）每個漢字的 pypinyin 聲調。
    text = normalize_zh(ZH_REPLY, "t2s")
    ref = [t for ch, t in zip(text, char_tones(text)) if is_han(ch)]
    assert out["dialogues"] == 2
    assert out["scored"] == len(ref) == 12
    assert out["accuracy"] == pytest.approx(ref.count(3) / len(ref))
    assert out["per_tone"]["3"]["correct"] == ref.count(3) > 0
    for t in ("1", "2", "4", "5"):
        assert out["per_tone"][t]["scored"] == ref.count(int(t))
        assert out["per_tone"][t]["correct"] == 0


def test_tone_head_accuracy_no_tones(tone3_run, tmp_path: Path) -> None:
    cfg, task, model = tone3_run
    out = tone_head_accuracy(cfg, task, model, [_row(tmp_path / "en.wav", "en", "okay sure")])
    assert out["dialogues"] == 1 and out["scored"] == 0 and out["accuracy"] is None


def test_tone_head_summary_counts() -> None:
    targets = np.array([[1, 0], [3, 5], [0, 0], [3, 2]])
    preds = np.array([[1, 4], [3, 3], [2, 2], [1, 2]])
    out = tone_head_summary(targets, preds)
    assert out["scored"] == 5 and out["correct"] == 3 and out["accuracy"] == pytest.approx(0.6)
    assert out["per_tone"]["3"] == {"scored": 2, "correct": 1, "accuracy": 0.5}
    assert out["per_tone"]["4"] == {"scored": 0, "correct": 0, "accuracy": None}
