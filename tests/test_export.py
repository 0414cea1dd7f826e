"""JAX → PyTorch 匯出：真實訓練兩步的檢查點匯出後，transformers 能讀、PyTorch 孿生與 JAX 一致。

訓練第 3 階段（第 2 階段 + 情緒頭與情緒條件，Qwen 上有 LoRA）兩步，經 CLI 函式匯出，然後：
transformers 載入 LLM 與 Whisper 編碼器並與 JAX 比對 logits／隱狀態；PyTorch 孿生的 ASR、
全雙工、逐幀串流與 JAX 比對；parity.json 的每一項差都在 1e-4 以內；LoRA 以非零低秩更新確認
匯出的是合併後的權重。
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from export import to_torch
from export.torch_model import HEADS_CONFIG, load_exported
from speakllm_jax.eval.evaluate import load_run
from speakllm_jax.models.lora import LoRALinear
from speakllm_jax.training.config_io import load_config
from speakllm_jax.training.loop import train

TOL = 1e-4


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("demo_export")
    old = os.environ.get("SPEAKLLM_DEMO_DIR")
    os.environ["SPEAKLLM_DEMO_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SPEAKLLM_DEMO_DIR", None)
    else:
        os.environ["SPEAKLLM_DEMO_DIR"] = old


@pytest.fixture(scope="module")
def run_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("run_phase3")
    cfg = load_config(
        "phase3",
        [
            "--config.train.steps=2",
            "--config.train.batch_size=2",
            "--config.mesh.data=1",
            "--config.logging.tensorboard=false",
        ],
    )
    train(cfg, workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "torch"
    assert to_torch.main(["--checkpoint", str(run_dir), "--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def jax_run(run_dir: Path):
    return load_run(run_dir)


def _all_floats(d: dict) -> list[float]:
    out: list[float] = []
    for v in d.values():
        if isinstance(v, dict):
            out += _all_floats(v)
        elif isinstance(v, list):
            out += [float(x) for x in v]
        elif isinstance(v, float):
            out.append(v)
    return out


def test_layout_and_parity_json(exported: Path, jax_run) -> None:
    cfg, task, model, step = jax_run
    for name in ("llm", "whisper_encoder", "depth", "tokenizer", "heads.safetensors"):
        assert (exported / name).exists(), name
    heads_cfg = json.loads((exported / HEADS_CONFIG).read_text())
    assert heads_cfg["num_emotions"] == model.cfg.num_emotions == 5
    assert heads_cfg["connector_stack"] == model.cfg.connector_stack
    assert heads_cfg["pad_id"] == task.pad_id
    assert json.loads((exported / "export_info.json").read_text())["step"] == step == 2

    report = json.loads((exported / "parity.json").read_text())
    assert report["seed"] == 3 and report["dtype"] == "float32"
    assert set(report["duplex"]) == {"codes", "emotion", "hidden", "text", "tones", "turn"}
    assert len(report["streaming_teacher"]["per_step"]) == 8
    assert report["streaming_free"]["ids_equal"] is True
    diffs = _all_floats({k: v for k, v in report.items() if isinstance(v, dict)})
    assert len(diffs) > 20 and max(diffs) <= TOL
    assert report["max_abs_diff"] == pytest.approx(max(diffs))

    # 分詞器：專案特殊符號的編號與訓練時相同。
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported / "tokenizer")
    for name in ("<|task_asr|>", "<|audio_start|>", "<|audio_end|>", "<|emo_neutral|>"):
        assert tok.convert_tokens_to_ids(name) == task.tokenizer.special_id(name)


def _hf_logits_vs_jax(hf_dir: Path, jax_llm, seed: int) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = np.random.default_rng(seed).integers(0, jax_llm.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        got = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    ref = np.asarray(jax_llm(jnp.asarray(ids, jnp.int32)))
    return float(np.max(np.abs(got - ref)))


def test_llm_loads_in_transformers(exported: Path, jax_run) -> None:
    _, _, model, _ = jax_run
    assert _hf_logits_vs_jax(exported / "llm", model.llm, 0) <= TOL
    assert _hf_logits_vs_jax(exported / "depth", model.speech_head.depth, 1) <= TOL


def test_lora_is_merged_on_export(jax_run, tmp_path: Path) -> None:
    _, task, model, _ = jax_run
    llm = nnx.clone(model.llm)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, llm.cfg.vocab_size, (1, 6)), jnp.int32)
    before = np.asarray(llm(ids))
    rng = np.random.default_rng(7)
    n_lora = 0
    for _, m in nnx.iter_graph(llm):
        if isinstance(m, LoRALinear):
            shape = m.lora_b[...].shape
            m.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, shape), m.lora_b[...].dtype)
            n_lora += 1
    assert n_lora > 0
    # 低秩更新大到足以讓「未合併就存檔」的錯誤被發現。
    assert float(np.max(np.abs(np.asarray(llm(ids)) - before))) > 100 * TOL
    from speakllm_jax.checkpoints.hf import save_qwen2

    save_qwen2(llm, tmp_path / "llm")
    assert _hf_logits_vs_jax(tmp_path / "llm", llm, 2) <= TOL


def test_whisper_encoder_loads_in_transformers(exported: Path, jax_run) -> None:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    _, _, model, _ = jax_run
    enc = WhisperEncoder.from_pretrained(exported / "whisper_encoder", dtype=torch.float32).eval()
    frames = 2 * enc.config.max_source_positions  # transformers 只接受恰好 3000 框
    feats = np.random.default_rng(0).normal(size=(1, enc.config.num_mel_bins, frames))
    feats = feats.astype(np.float32)
    with torch.no_grad():
        got = enc(torch.from_numpy(feats)).last_hidden_state.numpy()
    ref = np.asarray(model.encoder(jnp.asarray(feats)))
    assert float(np.max(np.abs(got - ref))) <= TOL


def test_torch_twin_matches_jax(exported: Path, jax_run) -> None:
    _, task, model, _ = jax_run
    tm = load_exported(exported)
    c = model.cfg
    rng = np.random.default_rng(11)
    b, n = 1, 6
    f = 4 * n
    x = {
        "features": rng.normal(size=(b, c.whisper.num_mel_bins, f)).astype(np.float32),
        "feature_mask": np.ones((b, f), bool),
        "text_in": rng.integers(0, c.qwen.vocab_size, (b, n)).astype(np.int32),
        "tones_in": rng.integers(0, 6, (b, n, c.max_chars_per_token)).astype(np.int32),
        "codes_in": rng.integers(0, 2048, (b, n, c.speech.num_codebooks)).astype(np.int32),
        "codes_in_valid": np.ones((b, n), bool),
        "codes_target": rng.integers(0, 2048, (b, n, c.speech.num_codebooks)).astype(np.int32),
        "frame_mask": np.ones((b, n), bool),
    }
    cond = np.asarray([task.tokenizer.special_id("<|emo_neutral|>")], np.int32)
    ref = model.duplex_forward(
        **{k: jnp.asarray(v) for k, v in x.items()}, cond_ids=jnp.asarray(cond), chunk_frames=2
    )
    got = tm.duplex_forward(**x, cond_ids=cond, chunk_frames=2)
    for key in ("text", "codes", "turn", "tones", "emotion"):
        assert float(np.max(np.abs(np.asarray(ref[key]) - got[key].numpy()))) <= TOL, key

    # 逐幀：一步的 KV 快取前向與整段前向（同一區塊遮罩）的最後一幀一致。
    user, _ = tm.encode_audio(x["features"], None, chunk_frames=2)
    cache = tm.new_cache()
    prev_keys = {"text": "text_in", "tones": "tones_in", "codes": "codes_in"}
    for t in range(n):
        prev = {k: torch.from_numpy(x[v][:, t : t + 1]).long() for k, v in prev_keys.items()}
        prev["codes_valid"] = torch.ones((b, 1), dtype=torch.bool)
        target = torch.from_numpy(x["codes_target"][:, t : t + 1]).long()
        cache, out = tm.frame_step(
            cache, t, user[:, t : t + 1], prev, target, torch.from_numpy(cond).long()
        )
        step_ref = np.asarray(ref["text"][:, t : t + 1])
        assert float(np.max(np.abs(step_ref - out["text"].numpy()))) <= TOL, t


def test_bad_export_dir_is_named(exported: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / HEADS_CONFIG).write_text(json.dumps({"llm_hidden": 64}))
    with pytest.raises(ValueError, match="heads_config.json.*whisper_d_model"):
        load_exported(broken)
    (broken / HEADS_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=HEADS_CONFIG):
        load_exported(broken)


def test_bf16_model_is_checked_in_fp32(exported: Path, jax_run) -> None:
    import dataclasses

    from export.parity import check_asr, fp32_copy
    from speakllm_jax.models.speakllm import SpeakLLM

    _, _, model, _ = jax_run
    c = model.cfg
    cfg = dataclasses.replace(
        c,
        whisper=c.whisper.replace(dtype=jnp.bfloat16),
        qwen=c.qwen.replace(dtype=jnp.bfloat16),
    )
    bf16 = nnx.eval_shape(lambda: SpeakLLM(cfg, rngs=nnx.Rngs(0)))
    nnx.update(bf16, nnx.state(model))
    tm = load_exported(exported)
    coarse = check_asr(bf16, tm, np.random.default_rng(0))["logits"]
    fine = check_asr(fp32_copy(bf16), tm, np.random.default_rng(0))["logits"]
    assert fine <= TOL < coarse


def test_phase0_model_exports_without_speech_head(demo_dir: Path, tmp_path: Path) -> None:
    from speakllm_jax.training.task import get_task

    task = get_task(load_config("phase0", []))
    model = task.build_model(nnx.Rngs(0))
    report = to_torch.export_model(model, tmp_path / "p0", task.tokenizer, parity_seed=1)
    assert set(report) >= {"asr", "max_abs_diff"} and "duplex" not in report
    assert report["max_abs_diff"] <= TOL
    assert not (tmp_path / "p0" / "depth").exists()
    tm = load_exported(tmp_path / "p0")
    with pytest.raises(ValueError, match="speech_head"):
        tm.duplex_forward(*([None] * 8))
