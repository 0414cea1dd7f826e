"""一份設定來源：預設區塊、匯出的 heads_config.json、服務端的會話設定、分片規則與音訊常數
都由同一份定義推得，新增欄位時這些測試會指出漏掉的地方。"""

from __future__ import annotations

import dataclasses
import re
import tokenize
from pathlib import Path

import jax
import pytest
from flax import nnx

from configs.base import base_config
from configs.models import model_config, qwen_preset, speech_preset, talker_preset, whisper_preset
from configs.serving import get_config as serving_config
from export.serving.session import SessionSettings
from export.to_torch import heads_config_from
from export.torch_model import NESTED_SOURCES, HeadsConfig
from speakllm_jax.audio import constants
from speakllm_jax.config import load_config
from speakllm_jax.labels import EMOTIONS
from speakllm_jax.models.axis_rules import DEFAULT_RULES
from speakllm_jax.models.qwen2 import Qwen2Config
from speakllm_jax.models.sharding import logical_to_spec, use_rules
from speakllm_jax.models.speakllm import (
    SpeakLLM,
    SpeakLLMConfig,
    build_speakllm_config,
    preset_fields,
)
from speakllm_jax.models.speech_heads import SpeechHeadConfig
from speakllm_jax.models.whisper import WhisperConfig
from speakllm_jax.training.sharding import make_mesh
from speakllm_jax.turn_policy import TurnRule

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("preset", "dataclass"),
    [
        (whisper_preset, WhisperConfig),
        (qwen_preset, Qwen2Config),
        (speech_preset, SpeechHeadConfig),
    ],
)
def test_tiny_and_full_presets_have_the_dataclass_fields(preset, dataclass) -> None:
    expected = set(preset_fields(dataclass()))
    assert set(preset("tiny").keys()) == expected
    assert set(preset("full").keys()) == expected


def test_talker_presets_match_and_build() -> None:
    tiny, full = talker_preset("tiny"), talker_preset("full")
    assert set(tiny.keys()) == set(full.keys())
    assert set(tiny.qwen.keys()) == set(full.qwen.keys()) == set(preset_fields(Qwen2Config()))
    assert full.qwen.hidden_size == 896 and full.speech_token_size == 6561
    mc = model_config("tiny")
    mc.speech_head = "cosyvoice2"
    cfg = build_speakllm_config(mc)
    assert cfg.talker.qwen.hidden_size == tiny.qwen.hidden_size
    assert cfg.talker.thinker_hidden == cfg.qwen.hidden_size


def test_full_preset_is_the_official_structure() -> None:
    cfg = build_speakllm_config(load_config("phase2:preset=full").model)
    assert (cfg.qwen.hidden_size, cfg.qwen.num_key_value_heads) == (3584, 4)
    assert (cfg.whisper.d_model, cfg.whisper.encoder_layers) == (1024, 24)
    assert cfg.speech == SpeechHeadConfig()


def test_heads_config_is_derived_from_the_model_config() -> None:
    scalars = {
        f.name: f.default
        for f in dataclasses.fields(SpeakLLMConfig)
        if f.default is not dataclasses.MISSING
        and not dataclasses.is_dataclass(f.default)
        and f.name != "talker"
    }
    heads = {f.name: f.default for f in dataclasses.fields(HeadsConfig)}
    # SpeakLLMConfig 的每個純量欄位都匯出，預設值相同；其餘欄位都指出來源（輪替規則來自訓練設定）。
    assert {k: heads.get(k, "缺少") for k in scalars} == scalars
    assert set(heads) - set(scalars) == set(NESTED_SOURCES) | {"pad_id", "turn_rule"}

    mc = load_config("phase3").model
    mc.streaming.llm_window_frames = 77
    model = nnx.eval_shape(lambda: SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0)))
    got = heads_config_from(model, pad_id=9)
    assert got.rule == TurnRule()
    rule = TurnRule.from_dict(load_config("phase2_turns").turn_rule)
    assert heads_config_from(model, pad_id=9, turn_rule=rule).rule == rule
    assert got.num_emotions == len(EMOTIONS) and got.llm_window_frames == 77 and got.pad_id == 9
    assert (got.whisper_d_model, got.llm_hidden) == (mc.whisper.d_model, mc.qwen.hidden_size)
    assert got.speech_head == "voila" and got.num_codebooks == mc.speech.num_codebooks


def test_session_settings_come_from_the_serving_config() -> None:
    serving = serving_config()
    for f in dataclasses.fields(SessionSettings):
        assert f.name in serving, f.name
        assert f.default == serving[f.name] and type(f.default) is type(serving[f.name])
    with serving.unlocked():
        serving.end_silence_ms = 480
    assert SessionSettings.from_config(serving).end_silence_frames == 12


def test_logical_axis_rules_is_a_config_field_that_changes_sharding() -> None:
    cfg = base_config()
    assert tuple(cfg.logical_axis_rules) == DEFAULT_RULES
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
    names, shape = ("embed", "mlp"), (64, 128)
    assert logical_to_spec(names, shape, mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    rules = load_config(
        "phase0", ["--config.logical_axis_rules=(('embed', None), ('mlp', ('fsdp', 'tensor')))"]
    ).logical_axis_rules
    with use_rules(rules):
        spec = logical_to_spec(names, shape, mesh)
    assert spec == jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))


def test_audio_and_frame_constants_defined_once() -> None:
    assert constants.FRAME_SAMPLES == 640 and constants.FRAME_SECONDS == 0.04
    assert constants.MELS_PER_FRAME * constants.FRAME_RATE == constants.MEL_RATE == 100
    pattern = re.compile(
        r"^[A-Z_]*(SAMPLE_RATE|SR|FRAME_SAMPLES|FRAME_SECONDS|FRAME_RATE|HOP_LENGTH|N_FFT)\s*=\s*[\d.]+",
        re.M,
    )
    found = []
    for top in ("speakllm_jax", "export", "configs", "data", "launch", "benchmarks"):
        for p in (REPO / top).rglob("*.py"):
            if p.name != "constants.py":
                found += [
                    f"{p.relative_to(REPO)}: {m.group(0)}"
                    for m in pattern.finditer(p.read_text("utf-8"))
                ]
    # 例外：CosyVoice2 token2wav 的 24 kHz 輸出、語料原始取樣率（不是模型的幀格）。
    allowed = (
        "export/cosyvoice2/token2wav.py: SAMPLE_RATE = 24000",
        "speakllm_jax/data/demo_corpus.py: CV_SR = 48000",
    )
    assert [f for f in found if f not in allowed] == []


def test_cli_defaults_and_configs_take_the_sample_rate_from_constants() -> None:
    """CLI 旗標的預設值、`configs/` 與基準腳本不再寫 16 kHz 的數字，改用 `audio/constants.py`
    （註解與說明文字不算）；例外只有語料本身的原始取樣率。"""
    found = []
    for top in ("configs", "data", "launch", "benchmarks", "examples"):
        for p in sorted((REPO / top).rglob("*.py")):
            with tokenize.open(p) as f:
                tokens = list(tokenize.generate_tokens(f.readline))
            found += [
                f"{p.relative_to(REPO)}:{t.start[0]}"
                for t in tokens
                if t.type == tokenize.NUMBER and t.string.replace("_", "") in ("16000", "16e3")
            ]
    # 例外：AISHELL-1 原始錄音是 16 kHz（語料的性質，不是模型的取樣率）。
    allowed = ["configs/data/asr_zh.py:19"]
    assert found == allowed
