"""JAX → PyTorch 匯出：真實訓練兩步的檢查點匯出後，transformers 能讀、PyTorch 孿生與 JAX 一致。

訓練第 3 階段（第 2 階段 + 情緒頭與情緒條件，Qwen 上有 LoRA）兩步，經 CLI 函式匯出，然後：
transformers 載入 LLM 與 Whisper 編碼器並與 JAX 比對 logits／隱狀態；PyTorch 孿生的 ASR、
全雙工、逐幀串流與 JAX 比對；parity.json 的每一項差都在 1e-4 以內；LoRA 以非零低秩更新確認
匯出的是合併後的權重。
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from export import to_torch
from export.torch_model import HEADS_CONFIG, load_exported
from speakllm_jax.config import load_config
from speakllm_jax.models.lora import LoRALinear
from speakllm_jax.training.loop import train
from speakllm_jax.training.runs import load_run
from tests.xla_test_flags import TEST_COMPILE_FLAGS

TOL = 1e-4


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


def _duplex_inputs(c, rng, b: int, n: int, valid_frac: float | None = None) -> dict:
    """`duplex_forward` 的隨機輸入（`n` 幀）；語音碼的層數與碼數取自模型設定。

    `valid_frac` 為 None 時每幀的上一幀語音碼都有效，否則約此比例有效。
    """
    q, size = c.speech.num_codebooks, c.speech.codebook_size
    f = 4 * n
    x = {
        "features": rng.normal(size=(b, c.whisper.num_mel_bins, f)).astype(np.float32),
        "feature_mask": np.ones((b, f), bool),
        "text_in": rng.integers(0, c.qwen.vocab_size, (b, n)).astype(np.int32),
        "tones_in": rng.integers(0, 6, (b, n, c.max_chars_per_token)).astype(np.int32),
        "codes_in": rng.integers(0, size, (b, n, q)).astype(np.int32),
    }
    x["codes_in_valid"] = (
        np.ones((b, n), bool) if valid_frac is None else rng.random((b, n)) < valid_frac
    )
    x["codes_target"] = rng.integers(0, size, (b, n, q)).astype(np.int32)
    x["frame_mask"] = np.ones((b, n), bool)
    return x


def test_torch_twin_matches_jax(exported: Path, jax_run) -> None:
    _, task, model, _ = jax_run
    tm = load_exported(exported)
    c = model.cfg
    rng = np.random.default_rng(11)
    b, n = 1, 6
    x = _duplex_inputs(c, rng, b, n)
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


REPO = Path(__file__).resolve().parents[1]
QUIET = ("pad_token_id", "must be `None` or an integer", "Metadata file does not exist")


def _run_quiet(args: list[str], *, optimized: bool = False) -> subprocess.CompletedProcess:
    """在子程序執行，回傳結果；stderr 中不應有程式庫的無用警告。

    `optimized=True` 時子程序不帶測試的 `TEST_COMPILE_FLAGS`（後端最佳化等級 0）：評估整段
    長對話是執行時間主導，預設等級較快（負載約 7 時 45 秒，等級 0 時 136 秒）。
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if optimized:
        env["XLA_FLAGS"] = " ".join(
            env.get("XLA_FLAGS", "").replace(TEST_COMPILE_FLAGS, "").split()
        )
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in QUIET:
        assert noise not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_evaluate_cli_on_all_demo_dialogues(run_dir: Path, demo_dir: Path) -> None:
    # 第 3 階段 = 第 2 階段的全雙工模型 + 情緒頭：評估所有示範對話，其中 dlg0002 約 45 秒，
    # 超過 Whisper 編碼器的 30 秒窗，逐窗編碼後整段評估，不當掉、不略過。
    from speakllm_jax.data.manifest import read_manifest

    _run_quiet(["launch/evaluate.py", "--workdir", str(run_dir)], optimized=True)
    report = json.loads((run_dir / "eval" / "step_2" / "report.json").read_text())
    rows = read_manifest(demo_dir / "duplex" / "dialogue.jsonl")
    duplex = report["duplex"]
    assert len(rows) == 3 and max(r["duration"] for r in rows) > 30.0
    assert duplex["dialogues"] == 3 and duplex["skipped"] == {} and duplex["skipped_items"] == []
    frames = [d["num_frames"] for d in duplex["metrics"]["dialogues"]]
    assert frames == [math.ceil(r["duration"] / 0.04 - 1e-9) for r in rows]
    assert max(frames) > 750  # 超過一個編碼窗（750 幀 = 30 秒）
    assert duplex["emotion"]["segments"] == 3
    names = sorted(Path(p).name for p in report["plots"])
    assert names == ["emotion_confusion.png"] + [f"timeline_{r['id']}.png" for r in rows]
    assert all(Path(p).exists() for p in report["plots"])


def test_exported_folder_loads_quietly(exported: Path) -> None:
    # 伺服器啟動時以 load_exported 讀匯出資料夾：transformers 不再對特殊符號 id 警告。
    cfg = json.loads((exported / "whisper_encoder" / "config.json").read_text())
    ids = [
        cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    ]
    assert all(0 <= i < cfg["vocab_size"] for i in ids)
    code = f"from export.torch_model import load_exported; load_exported({str(exported)!r})"
    _run_quiet(["-c", code])


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
    from speakllm_jax.training.tasks import get_task

    task = get_task(load_config("phase0", []))
    model = task.build_model(nnx.Rngs(0))
    report = to_torch.export_model(model, tmp_path / "p0", task.tokenizer, parity_seed=1)
    assert set(report) >= {"asr", "max_abs_diff"} and "duplex" not in report
    assert report["max_abs_diff"] <= TOL
    assert not (tmp_path / "p0" / "depth").exists()
    tm = load_exported(tmp_path / "p0")
    with pytest.raises(ValueError, match="speech_head"):
        tm.duplex_forward(*([None] * 8))


# ---------------------------------------------------------------- CosyVoice2 語音頭


@pytest.fixture(scope="module")
def cosy(tmp_path_factory: pytest.TempPathFactory):
    """`speech_head="cosyvoice2"` 的 tiny 全雙工模型（第 2 階段設定、隨機初始化）與其匯出。"""
    from speakllm_jax.training.tasks import get_task

    task = get_task(load_config("phase2", ["--config.model.speech_head=cosyvoice2"]))
    model = task.build_model(nnx.Rngs(4))
    out = tmp_path_factory.mktemp("export_cosy") / "torch"
    report = to_torch.export_model(model, out, task.tokenizer, pad_id=task.pad_id, parity_seed=2)
    return task, model, out, report


def test_cosyvoice2_export_layout_and_parity(cosy) -> None:
    from safetensors import safe_open

    from export.torch_model import TALKER_CONFIG, TALKER_DIR, TALKER_WEIGHTS

    task, model, out, report = cosy
    for name in ("llm", "whisper_encoder", "tokenizer", "heads.safetensors", TALKER_DIR):
        assert (out / name).exists(), name
    assert not (out / "depth").exists()
    heads_cfg = json.loads((out / HEADS_CONFIG).read_text())
    assert heads_cfg["speech_head"] == "cosyvoice2"
    assert (heads_cfg["num_codebooks"], heads_cfg["codebook_size"]) == (1, 6564)
    tcfg = json.loads((out / TALKER_DIR / TALKER_CONFIG).read_text())
    assert tcfg["thinker_hidden"] == model.cfg.qwen.hidden_size
    assert tcfg["qwen"]["hidden_size"] == model.cfg.talker.qwen.hidden_size

    # 官方 llm.pt 的鍵佈局（Qwen2LM.state_dict）+ 融合模組。
    tc = model.cfg.talker
    d = tc.qwen.hidden_size
    with safe_open(str(out / TALKER_DIR / TALKER_WEIGHTS), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["speech_embedding.weight"] == (6564, d)
    assert shapes["llm_embedding.weight"] == (2, d)
    assert shapes["llm_decoder.weight"] == (6564, d) and shapes["llm_decoder.bias"] == (6564,)
    assert shapes["llm.model.model.embed_tokens.weight"] == (tc.qwen.vocab_size, d)
    assert "llm.model.lm_head.weight" in shapes
    for i in range(tc.qwen.num_hidden_layers):
        assert f"llm.model.model.layers.{i}.self_attn.q_proj.bias" in shapes
    assert {"fusion.proj_in.weight", "fusion.gate.bias"} <= set(shapes)

    assert report["dtype"] == "float32" and report["seed"] == 2
    assert set(report["duplex"]) == {"codes", "hidden", "text", "tones", "turn"}
    assert len(report["streaming_teacher"]["per_step"]) == 8
    assert report["streaming_free"]["ids_equal"] is True
    assert "talker_interleaved" in report
    diffs = _all_floats({k: v for k, v in report.items() if isinstance(v, dict)})
    assert len(diffs) > 20 and max(diffs) <= TOL
    assert json.loads((out / "parity.json").read_text())["max_abs_diff"] == pytest.approx(
        report["max_abs_diff"]
    )


def test_cosyvoice2_twin_matches_jax_forward_and_steps(cosy) -> None:
    """整段前向（含 talker 融合）與逐幀（思考者與 talker 各自的 KV 快取）都與 JAX 相同。"""
    from speakllm_jax.models.streaming import run_streaming

    task, model, out, _ = cosy
    tm = load_exported(out)
    c = model.cfg
    rng = np.random.default_rng(21)
    b, n = 1, 6
    x = _duplex_inputs(c, rng, b, n, valid_frac=0.7)
    text_out = rng.integers(0, c.qwen.vocab_size, (b, n)).astype(np.int32)
    ref = model.duplex_forward(
        **{k: jnp.asarray(v) for k, v in x.items()},
        chunk_frames=2,
        text_out=jnp.asarray(text_out),
    )
    got = tm.duplex_forward(**x, chunk_frames=2, text_out=text_out)
    assert got["codes"].shape == (b, n, 1, 6564)
    for key in ("text", "codes", "turn", "tones", "hidden"):
        assert float(np.max(np.abs(np.asarray(ref[key]) - got[key].numpy()))) <= TOL, key
    # 融合真的用到思考者隱狀態：換掉 text_out 會改變語音碼 logits。
    other = tm.duplex_forward(**x, chunk_frames=2, text_out=(text_out + 1) % c.qwen.vocab_size)
    assert float((other["codes"] - got["codes"]).abs().max()) > 100 * TOL

    # 逐幀教師強制：一步的 KV 快取前向（思考者 + talker）與整段前向的同一幀一致。
    user, _ = tm.encode_audio(x["features"], None, chunk_frames=2)
    cache = tm.new_cache()
    for t in range(n):
        prev = {
            "text": torch.from_numpy(x["text_in"][:, t : t + 1]).long(),
            "tones": torch.from_numpy(x["tones_in"][:, t : t + 1]).long(),
            "codes": torch.from_numpy(x["codes_in"][:, t : t + 1]).long(),
            "codes_valid": torch.from_numpy(x["codes_in_valid"][:, t : t + 1]),
        }
        target = torch.from_numpy(x["codes_target"][:, t : t + 1]).long()
        cache, step = tm.frame_step(
            cache,
            t,
            user[:, t : t + 1],
            prev,
            target,
            None,
            torch.from_numpy(text_out[:, t : t + 1]),
        )
        assert cache.talker.get_seq_length() == t + 1
        step_ref = np.asarray(ref["codes"][:, t : t + 1])
        assert float(np.max(np.abs(step_ref - step["codes"].numpy()))) <= TOL, t

    # 自由執行：貪婪文字與 talker 逐幀產生的語音碼與 JAX `run_streaming` 完全相同。
    frames = 10
    feats = rng.normal(size=(1, c.whisper.num_mel_bins, 4 * frames)).astype(np.float32)
    pad = int(task.pad_id)
    jref = run_streaming(model, feats, frames, 2, pad_id=pad)
    tgot = tm.stream(feats, frames, 2, pad_id=pad)
    assert np.array_equal(jref.text, tgot["text"]) and np.array_equal(jref.codes, tgot["codes"])
    assert tgot["codes"].shape == (1, frames, 1) and int(tgot["codes"].max()) < 6561
    assert float(np.max(np.abs(jref.text_logits - tgot["text_logits"]))) <= TOL


def test_cosyvoice2_talker_folder_errors_are_named(cosy, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from export.torch_model import TALKER_CONFIG, TALKER_DIR, TALKER_WEIGHTS

    _, _, out, _ = cosy
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / TALKER_DIR / TALKER_WEIGHTS
    state = load_file(str(weights))
    state.pop("llm_decoder.bias")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="llm_decoder.bias"):
        load_exported(broken)
    (broken / TALKER_DIR / TALKER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=TALKER_CONFIG):
        load_exported(broken)
    shutil.rmtree(broken / TALKER_DIR)
    with pytest.raises(FileNotFoundError, match=TALKER_DIR):
        load_exported(broken)


def test_cosyvoice2_talker_file_reloads_in_jax(cosy) -> None:
    """`talker/llm.safetensors` 也能由 JAX 的官方佈局讀取器讀回，前向與原 talker 相同。"""
    from export.torch_model import TALKER_DIR, TALKER_WEIGHTS
    from speakllm_jax.checkpoints.cosyvoice2_llm import load_cosyvoice2_llm

    _, model, out, _ = cosy
    talker = model.speech_head
    back = load_cosyvoice2_llm(out / TALKER_DIR / TALKER_WEIGHTS, talker.cfg)
    rng = np.random.default_rng(3)
    n = 5
    hidden = jnp.asarray(rng.normal(size=(1, n, talker.cfg.thinker_hidden)), jnp.float32)
    text = jnp.asarray(rng.integers(0, 1000, (1, n)), jnp.int32)
    codes = jnp.asarray(rng.integers(0, 6561, (1, n)), jnp.int32)
    valid = jnp.ones((1, n), bool)
    a = np.asarray(talker.forward_frames(hidden, text, codes, valid))
    b = np.asarray(back.forward_frames(hidden, text, codes, valid))
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_cosyvoice2_trained_run_exports_via_cli(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """訓練 `speech_head="cosyvoice2"` 兩步後以 `python -m export.to_torch` 匯出：有 talker/、
    parity.json 的每一項差都在 1e-4 以內（約 2 分鐘，標為 slow）。"""
    from export.torch_model import TALKER_DIR

    workdir = tmp_path_factory.mktemp("run_cosy")
    cfg = load_config(
        "phase2",
        [
            "--config.model.speech_head=cosyvoice2",
            "--config.train.steps=2",
            "--config.train.batch_size=2",
            "--config.mesh.data=1",
            "--config.logging.tensorboard=false",
        ],
    )
    train(cfg, workdir, progress=False)
    out = tmp_path_factory.mktemp("export_cosy_run") / "torch"
    assert to_torch.main(["--checkpoint", str(workdir), "--out", str(out), "--seed", "1"]) == 0
    assert (out / TALKER_DIR).exists() and not (out / "depth").exists()
    report = json.loads((out / "parity.json").read_text())
    assert "talker_interleaved" in report and report["streaming_free"]["ids_equal"] is True
    diffs = _all_floats({k: v for k, v in report.items() if isinstance(v, dict)})
    assert len(diffs) > 20 and max(diffs) <= TOL
    assert json.loads((out / "export_info.json").read_text())["step"] == 2
