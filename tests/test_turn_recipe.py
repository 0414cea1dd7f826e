"""輪替配方（`configs/phase2_turns.py`）端到端：在兩段精簡輪替示範對話上訓練幾步 →
`launch/evaluate.py --duplex-server`（匯出、loopback 伺服器、`model` 與 `vad` 並列）；
以及同一個匯出模型上，JAX 串流推論與 PyTorch 孿生逐幀的輪替決策相同（同一個 `TurnRule`）。

完整配方（150 段對話、數百步）見 `benchmarks/bench_turn_recipe.py`。"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from speakllm_jax.data.demo_corpus import has_espeak
from speakllm_jax.data.demo_data import turn_dialogue_manifest
from speakllm_jax.eval.duplex_bench import METRIC_KEYS, RATE_KEYS, check_report

ROOT = Path(__file__).resolve().parents[1]


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not has_espeak():
        pytest.skip("需要 espeak-ng")
    d = tmp_path_factory.mktemp("turn_recipe")
    lines = turn_dialogue_manifest(d, n=3, compact=True).read_text("utf-8").splitlines()
    rows = [r for r in map(json.loads, lines) if r["language"] != "zh"]
    out = d / "two.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return out


@pytest.fixture(scope="module")
def run(dialogues: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from speakllm_jax.training.config_io import load_config
    from speakllm_jax.training.loop import train

    rows = [json.loads(x) for x in dialogues.read_text("utf-8").splitlines()]
    frames = int(math.ceil(max(r["duration"] for r in rows) / 0.04 / 16) * 16)
    cfg = load_config(
        "phase2_turns",
        [
            f"--config.data.train_manifests={dialogues}",
            f"--config.data.max_frames={frames}",
            "--config.train.steps=3",
            "--config.train.batch_size=1",
            "--config.checkpoint.async_save=False",
            "--config.logging.tensorboard=False",
            "--config.logging.plot=False",
        ],
    )
    workdir = tmp_path_factory.mktemp("turn_run") / "run"
    result = train(cfg, workdir, progress=False)
    assert result.final_step == 3
    return workdir


def test_recipe_trains_and_scores_through_the_server(run: Path, dialogues: Path, capsys) -> None:
    out = run.parent / "fdx"
    args = ["--workdir", str(run), "--duplex-server", "--manifest", str(dialogues)]
    args += ["--policies", "model,vad", "--out", str(out)]
    # 覆寫匯出的決策規則（不重新匯出），四條串流同時送（伺服器批次前進）。
    args += ["--turn_rule", "cooldown_frames=5,overlap_stop_threshold=0.95", "--concurrency", "4"]
    assert _cli("evaluate")(args) == 0
    assert "| smooth_takeover_rate |" in capsys.readouterr().out
    report = json.loads((out / "turn_taking.json").read_text("utf-8"))
    assert check_report(report) == []
    assert report["n_dialogues"] == 2 and set(report["policies"]) == {"model", "vad"}
    for m in report["policies"].values():
        for k in METRIC_KEYS:
            v = m[k]
            assert v is None or (0.0 <= v <= 1.0 if k in RATE_KEYS else v >= 0.0), (k, v)
        # 兩段對話各一個停頓、一個附和、一次搶話，輪次結束 4 個。
        assert m["events"]["pauses"] == 2 and m["events"]["backchannels"] == 2
        assert m["events"]["interruptions"] == 2 and m["events"]["turn_ends"] == 4
        assert set(m["by_language"]) == {"en", "cs"}
    # 匯出帶著訓練設定的決策規則。
    heads = json.loads((out / "export" / "heads_config.json").read_text("utf-8"))
    cfg = json.loads((run / "config.json").read_text("utf-8"))
    assert heads["turn_rule"] == cfg["turn_rule"]
    # 報表記下 policy=model 實際用的規則：匯出的規則加上覆寫。
    want = dict(cfg["turn_rule"], cooldown_frames=5, overlap_stop_threshold=0.95)
    assert report["turn_rule"] == want


def test_jax_and_torch_turn_decisions_match(run: Path, dialogues: Path) -> None:
    """同一段對話自由執行：JAX `run_streaming` 與孿生 `stream` 每幀的輪替決策相同，且決策有開有停。"""
    from export.to_torch import export_model
    from export.torch_model import load_exported
    from speakllm_jax.audio.features import log_mel_np
    from speakllm_jax.data.duplex import build_duplex_example
    from speakllm_jax.models.streaming import run_streaming
    from speakllm_jax.training.runs import load_run
    from speakllm_jax.turn_policy import TurnRule, decide_all, softmax

    cfg, task, model, _ = load_run(run)
    row = json.loads(dialogues.read_text("utf-8").splitlines()[0])
    ex = build_duplex_example(row, task.tokenizer)
    n = ex.num_frames
    feats = log_mel_np(ex.user_audio, n_mels=int(cfg.data.n_mels), pad_to_seconds=None)
    feats = feats[None, :, : 4 * n]
    chunk = max(1, int(model.cfg.stream_chunk_frames))
    # 以這個模型聆聽時自己的說話機率選開口門檻（先以永不開口的規則跑一遍），讓決策在這段對話上
    # 有聽有說（規則本身不變）。
    never = TurnRule(start_threshold=1.0, yield_threshold=1.0)
    probe = run_streaming(model, feats, n, chunk, pad_id=task.pad_id, turn_rule=never)
    talk = np.asarray([sum(softmax(r)[a] for a in (1, 2, 4)) for r in probe.turn_logits[0]])
    start = float(np.quantile(talk, 0.9))
    rule = TurnRule(
        start_threshold=start,
        stop_threshold=1.0 - start / 2,
        yield_threshold=1.0,
        min_speak_frames=2,
    )
    d = run.parent / "parity_export"
    export_model(model, d, task.tokenizer, pad_id=task.pad_id, parity_seed=None, turn_rule=rule)
    tm = load_exported(d)
    assert tm.cfg.rule == rule
    jx = run_streaming(model, feats, n, chunk, pad_id=task.pad_id, turn_rule=rule)
    pt = tm.stream(feats, n, chunk)
    np.testing.assert_array_equal(pt["turn"], jx.turn)
    acts = set(jx.turn[0].tolist())
    assert {0, 1, 2} <= acts, acts
    # 決策只由 logits 與規則決定：對 JAX 的逐幀 logits 離線重算得到同一串。
    assert decide_all(jx.turn_logits[0], rule) == jx.turn[0].tolist()
