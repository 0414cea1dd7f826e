"""訓練引擎：各階段在 8 個模擬裝置上能跑且損失下降、SIGKILL 後精確恢復、SIGTERM 存檔、
NaN 步不套用、雙程序（gloo）與單程序結果一致。"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from speakllm_jax.config import load_config
from speakllm_jax.training.checkpointing import Checkpointer
from speakllm_jax.training.loop import TooManyBadSteps, train

REPO = Path(__file__).resolve().parents[1]
# 一個桶、所有示範句都放得下：單程序與雙程序看到同一組樣本。
# 網格預設只用 1 個裝置：8 個模擬裝置在 2 核 CPU 上做複製計算只會更慢（8 裝置測試另外指定網格）。
FAST = [
    "--config.mesh.data=1",
    "--config.train.batch_size=4",
    "--config.data.bucket_frames=(800,)",
    "--config.data.max_text_tokens=40",
    "--config.logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def demo_env(demo_dir: Path) -> dict[str, str]:
    """所有執行共用整次 pytest 的示範語料（`demo_dir`；子程序經環境變數取得同一份）。"""
    from speakllm_jax.data.demo_data import demo_manifest

    demo_manifest(("aishell1", "commonvoice_zh", "commonvoice_en"), demo_dir)
    return dict(os.environ)


def _cfg(*overrides: str, name: str = "phase0"):
    return load_config(name, FAST + list(overrides))


def _final_params(workdir: Path) -> dict:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    step = ckpt.latest_step()
    params = ckpt.restore_params(step)
    ckpt.close()
    return step, params


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _train_cli(workdir: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        "phase0",
        "--workdir",
        str(workdir),
        "--no_progress",
        *FAST,
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_overrides_and_errors() -> None:
    cfg = load_config("phase0", ["--config.optim.lr=3e-4", "--config.train.steps", "7"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.steps == 7
    full = load_config("phase0", ["--config.preset=full"])
    assert full.model.qwen.hidden_size == 3584 and full.model.whisper.d_model == 1024
    # big_vision 式：檔案路徑或短名稱加 `:preset=full`，覆寫照常套用
    by_path = load_config(
        f"{REPO / 'configs' / 'phase2_duplex.py'}:preset=full", ["--config.seed=3"]
    )
    assert by_path.model.qwen.hidden_size == 3584 and by_path.seed == 3
    assert (
        load_config("phase2:full").to_dict()
        == load_config("phase2", ["--config.preset=full"]).to_dict()
    )
    with pytest.raises(KeyError, match="optim.nope"):
        load_config("phase0", ["--config.optim.nope=1"])
    with pytest.raises(FileNotFoundError, match="phase9"):
        load_config("phase9")
    with pytest.raises(ValueError, match="布林"):
        load_config("phase0", ["--config.logging.plot=maybe"])
    with pytest.raises(ValueError, match=r"--config\.train\.steps 需要 int，收到 'abc'"):
        load_config("phase0", ["--config.train.steps=abc"])
    with pytest.raises(ValueError, match="需要 int"):
        load_config("phase0", ["--config.train.steps=1.5"])
    assert load_config("phase0", ["--config.train.steps=1e3"]).train.steps == 1000
    with pytest.raises(KeyError, match="你是不是要 optim.lr"):
        load_config("phase0", ["--config.optim.lrr=1"])
    with pytest.raises(KeyError, match="不是區塊"):
        load_config("phase0", ["--config.train.steps.x=1"])


def test_phase0_on_8_devices_loss_falls(demo_env, tmp_path: Path) -> None:
    assert jax.device_count() == 8
    cfg = _cfg(
        "--config.train.steps=8",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.checkpoint.every_steps=100",
        "--config.logging.tensorboard=true",
        "--config.train.eval_every=4",
        "--config.train.eval_batches=2",
    )
    result = train(cfg, tmp_path, progress=False, keep_state=True)
    assert result.final_step == 8 and len(result.losses) == 8
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    # 參數真的分到網格上，凍結的部分沒有優化器狀態。
    emb = result.state.frozen["llm"]["embed_tokens"]["embedding"]
    assert len(emb.sharding.device_set) == 8
    opt_leaves = jax.tree.leaves(result.state.opt_state)
    n_opt = sum(x.size for x in opt_leaves)
    n_train = sum(x.size for x in jax.tree.leaves(result.state.params))
    assert n_opt <= 2 * n_train + 16
    assert (tmp_path / "config.json").exists() and (tmp_path / "loss_curve.png").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "8").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(np.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in evals)


def test_exact_resume_after_sigkill(demo_env, tmp_path: Path) -> None:
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    common = ["--config.train.steps=20", "--config.checkpoint.every_steps=10"]
    ref = train(_cfg(*common), full_dir, progress=False)
    assert ref.final_step == 20

    proc = _train_cli(killed_dir, *common, env=demo_env)
    ckpt10 = killed_dir / "checkpoints" / "10"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpt10 / "_CHECKPOINT_METADATA").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpt = Checkpointer(killed_dir / "checkpoints", async_save=False)
    latest = ckpt.latest_step()
    ckpt.close()
    assert latest is not None and 10 <= latest < 20

    resumed = train(_cfg(*common), killed_dir, progress=False)
    assert resumed.resumed_from == latest and resumed.final_step == 20
    step_a, a = _final_params(full_dir)
    step_b, b = _final_params(killed_dir)
    assert step_a == step_b == 20
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_sigterm_saves_current_step(demo_env, tmp_path: Path) -> None:
    proc = _train_cli(
        tmp_path, "--config.train.steps=200", "--config.checkpoint.every_steps=1000", env=demo_env
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    latest = ckpt.latest_step()
    ckpt.close()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert latest == logged[-1] and 3 <= latest < 200
    # 能從該檢查點恢復並繼續。
    resumed = train(_cfg(f"--config.train.steps={latest + 1}"), tmp_path, progress=False)
    assert resumed.resumed_from == latest and resumed.final_step == latest + 1


def test_nan_step_is_skipped_then_stops(demo_env, tmp_path: Path) -> None:
    cfg = _cfg(
        "--config.train.steps=4",
        "--config.train.inject_nan_steps=(3,)",
        "--config.checkpoint.every_steps=100",
    )
    result = train(cfg, tmp_path / "a", progress=False, keep_state=True)
    assert result.bad_steps == 1 and len(result.losses) == 3
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(result.state.params))

    strict = _cfg(
        "--config.train.steps=4",
        "--config.train.inject_nan_steps=(2,)",
        "--config.train.max_bad_steps=0",
    )
    with pytest.raises(TooManyBadSteps, match="max_bad_steps"):
        train(strict, tmp_path / "b", progress=False)


@pytest.mark.parametrize("nproc", [2])
def test_two_process_gloo_matches_single_process(demo_env, tmp_path: Path, nproc: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [
        "--config.train.steps=3",
        "--config.checkpoint.every_steps=100",
        "--config.mesh.data=-1",
    ]
    env = dict(demo_env)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    procs = []
    for pid in range(nproc):
        procs.append(
            _train_cli(
                tmp_path / "multi",
                *common,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={nproc}",
                f"--config.distributed.process_id={pid}",
                env=env,
            )
        )
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    single = _train_cli(tmp_path / "single", *common, env=env)
    out = single.communicate(timeout=400)[0]
    assert single.returncode == 0, out
    la = [
        json.loads(x)["loss"]
        for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    ]
    lb = [
        json.loads(x)["loss"]
        for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    _, a = _final_params(tmp_path / "multi")
    _, b = _final_params(tmp_path / "single")
    fa, fb = _flat(a), _flat(b)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], atol=1e-5, err_msg=k)


def test_bf16_compute_keeps_fp32_master_weights(demo_env, tmp_path: Path) -> None:
    cfg = _cfg(
        "--config.train.steps=2",
        "--config.model.dtype=bfloat16",
        "--config.checkpoint.every_steps=100",
        "--config.train.grad_accum=2",
    )
    result = train(cfg, tmp_path, progress=False, keep_state=True)
    assert result.final_step == 2 and all(np.isfinite(result.losses))
    dtypes = {x.dtype for x in jax.tree.leaves(result.state.params)}
    assert dtypes == {np.dtype("float32")}
    assert result.state.frozen["llm"]["embed_tokens"]["embedding"].dtype == np.float32


def test_compilation_cache_dir_field_fills_the_folder(tmp_path: Path) -> None:
    """`train.compilation_cache_dir` 把 JAX 的持久編譯快取放到該資料夾（新程序，第一次編譯之前
    設定；環境變數的快取關掉，確定是設定欄位起作用）；空字串不改 JAX 的設定。"""
    from ml_collections import ConfigDict

    from speakllm_jax.training.loop import use_compilation_cache

    assert use_compilation_cache(ConfigDict({"compilation_cache_dir": ""})) is None
    cache = tmp_path / "cache"
    code = (
        "import jax, jax.numpy as jnp\n"
        "from ml_collections import ConfigDict\n"
        "from speakllm_jax.training.loop import use_compilation_cache\n"
        f"print(use_compilation_cache(ConfigDict({{'compilation_cache_dir': {str(cache)!r}}})))\n"
        "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()\n"
    )
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(cache)
    assert cache.is_dir() and any(cache.iterdir())
