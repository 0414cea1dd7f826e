"""全尺寸規劃器：子程序執行 `launch/plan.py`（full 預設、Whisper-medium + Qwen2.5-7B），
每裝置的參數與優化器位元組必須等於由模型尺寸獨立算出的數字，並確實編譯了訓練步。"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Qwen2.5-7B 與 Whisper-medium 的尺寸（與 configs/models.py 的 full 預設相同，獨立寫出）。
V, E, M, L = 152_064, 3584, 18_944, 28
HQ, HKV = 28 * 128, 4 * 128
D, F, LE, MEL, POS = 1024, 4096, 24, 80, 1500
STACK = 2


def _leaves() -> list[tuple[str, int, bool]]:
    """(名稱, 元素數, 是否帶 embed 軸)；只有 fsdp 網格時，帶 embed 軸者依 fsdp 分片，其餘複製。"""
    qwen = [("llm/embed_tokens", V * E, True), ("llm/norm", E, False), ("llm/lm_head", E * V, True)]
    per_layer = [
        ("q_kernel", E * HQ, True),
        ("q_bias", HQ, False),
        ("k_kernel", E * HKV, True),
        ("k_bias", HKV, False),
        ("v_kernel", E * HKV, True),
        ("v_bias", HKV, False),
        ("o_kernel", HQ * E, True),
        ("gate", E * M, True),
        ("up", E * M, True),
        ("down", M * E, True),
        ("input_layernorm", E, False),
        ("post_attention_layernorm", E, False),
    ]
    qwen += [(f"llm/layers/{n}", L * size, s) for n, size, s in per_layer]
    enc = [
        ("encoder/conv1/kernel", 3 * MEL * D, False),
        ("encoder/conv1/bias", D, False),
        ("encoder/conv2/kernel", 3 * D * D, False),
        ("encoder/conv2/bias", D, False),
        ("encoder/embed_positions", POS * D, True),
        ("encoder/layer_norm", 2 * D, False),
    ]
    enc_layer = [
        ("q_kernel", D * D, True),
        ("q_bias", D, False),
        ("k_kernel", D * D, True),
        ("v_kernel", D * D, True),
        ("v_bias", D, False),
        ("out_kernel", D * D, True),
        ("out_bias", D, True),
        ("attn_ln", 2 * D, False),
        ("fc1_kernel", D * F, True),
        ("fc1_bias", F, False),
        ("fc2_kernel", F * D, True),
        ("fc2_bias", D, True),
        ("final_ln", 2 * D, False),
    ]
    enc += [(f"encoder/layers/{n}", LE * size, s) for n, size, s in enc_layer]
    conn = [
        ("connector/norm", 2 * STACK * D, False),
        ("connector/fc1/kernel", STACK * D * E, True),
        ("connector/fc1/bias", E, False),
        ("connector/fc2/kernel", E * E, True),
        ("connector/fc2/bias", E, True),
    ]
    return qwen + enc + conn


def _expected(fsdp: int, prefix: str | None = None) -> tuple[int, int]:
    """(元素數, 每裝置 fp32 位元組)；`prefix` 只計該前綴的參數。"""
    n = b = 0
    for name, size, sharded in _leaves():
        if prefix is not None and not name.startswith(prefix):
            continue
        n += size
        b += size * 4 // (fsdp if sharded else 1)
    return n, b


def _run_plan(tmp_path: Path, *args: str, timeout: int = 300) -> dict:
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, str(REPO / "launch" / "plan.py"), "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode in (0, 2), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "XLA memory_analysis" in proc.stdout or "--no_compile" in args
    return json.loads(out.read_text())


def test_parameter_count_matches_qwen_7b() -> None:
    n_qwen = sum(s for name, s, _ in _leaves() if name.startswith("llm/"))
    assert n_qwen == 7_615_616_512


def test_parse_mesh_and_errors() -> None:
    from speakllm_jax.training.planner import mesh_size, parse_mesh

    assert parse_mesh("fsdp=64") == {"data": 1, "fsdp": 64, "tensor": 1}
    m = parse_mesh("data=2,fsdp=16,tensor=2")
    assert m == {"data": 2, "fsdp": 16, "tensor": 2} and mesh_size(m) == 64
    for bad in ("fsdp", "pipe=2", "fsdp=0", "fsdp=x", "fsdp=2,fsdp=4", ""):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)


# 64 裝置的編譯在 2 核機器上約 1 分鐘：放在 slow；8 裝置走同一條路。
@pytest.mark.parametrize("fsdp", [8, pytest.param(64, marks=pytest.mark.slow)])
def test_full_preset_connector_compiles_and_bytes_match(tmp_path: Path, fsdp: int) -> None:
    """第 0 階段（只訓練連接器）：每裝置參數位元組 = Σ 葉節點 fp32 位元組 ÷ 分片數。"""
    r = _run_plan(
        tmp_path,
        "--config",
        "phase0",
        "--config.preset=full",
        "--mesh",
        f"fsdp={fsdp}",
        "--batch",
        str(fsdp),
        "--tpu",
        "v5p",
    )
    n_all, b_all = _expected(fsdp)
    n_conn, b_conn = _expected(fsdp, "connector/")
    assert r["devices"] == fsdp and r["mesh"] == {"data": 1, "fsdp": fsdp, "tensor": 1}
    assert r["batch"]["mel"] == [fsdp, 80, 800]
    assert r["params_total"] == n_all
    assert r["params_trainable"] == n_conn
    assert r["bytes_params_per_device"] == b_all
    assert r["bytes_trainable_per_device"] == b_conn
    # AdamW 的 mu、nu 與參數同形同分片，另有兩個 int32 計數器。
    assert r["bytes_opt_state_per_device"] == 2 * b_conn + 8
    x = r["xla"]
    # 捐贈的狀態與輸出共用緩衝區；XLA 看到的引數 = 訓練狀態 + 批次（每裝置）。
    assert x["argument_size_in_bytes"] == r["bytes_state_per_device"] + r["bytes_batch_per_device"]
    assert x["alias_size_in_bytes"] == r["bytes_state_per_device"]
    assert x["temp_size_in_bytes"] > 0
    assert r["fits"]["v5p"] == (r["peak_bytes_per_device"] <= 95 * 1024**3)
    assert r["seconds"]["compile"] > 0 and r["xla_flops_per_device"] > 0


def test_full_finetune_tensor_mesh_bytes(tmp_path: Path) -> None:
    """全參數微調（`trainable=(".*",)`）在 data×fsdp×tensor 網格上只算分片位元組（不編譯）。"""
    r = _run_plan(
        tmp_path,
        "--config",
        "phase0",
        "--config.preset=full",
        '--config.trainable=(".*",)',
        "--mesh",
        "data=2,fsdp=4,tensor=2",
        "--no_compile",
        "--leaves",
    )
    n_all, _ = _expected(4)
    # 只有編碼器位置表（緩衝區，不是 nnx.Param）保持凍結。
    assert r["params_frozen"] == POS * D
    assert r["params_trainable"] == n_all - POS * D
    # 每個葉節點：位元組 × 分片數 = 全尺寸位元組，分片數整除 fsdp×tensor。
    for leaf in r["leaves"]:
        if leaf["dtype"] == "float32":
            full = 4 * math.prod(leaf["shape"])
            assert leaf["bytes_per_device"] * leaf["shards"] == full, leaf
            assert 8 % leaf["shards"] == 0, leaf
    # q 投影 [層, embed, heads]：embed 依 fsdp(4)、heads 依 tensor(2) 分片。
    q = [
        lf
        for lf in r["leaves"]
        if lf["path"].startswith("params/llm/layers/self_attn/q_proj/kernel")
    ]
    assert q and q[0]["shards"] == 8
    assert r["bytes_opt_state_per_device"] == 2 * r["bytes_trainable_per_device"] + 8


def test_duplex_phase_frozen_bytes_and_batch(tmp_path: Path) -> None:
    """第 2 階段（全雙工，LoRA）：凍結的 Whisper + Qwen 本體位元組與第 0 階段的算術相同。"""
    r = _run_plan(
        tmp_path,
        "--config",
        "phase2",
        "--config.preset=full",
        "--mesh",
        "fsdp=8",
        "--batch",
        "8",
        "--frames",
        "64",
        "--no_compile",
    )
    n_all, b_all = _expected(8)
    n_conn, b_conn = _expected(8, "connector/")
    assert r["params_frozen"] == n_all - n_conn
    assert r["bytes_frozen_per_device"] == b_all - b_conn
    assert r["params_trainable"] > n_conn
    assert r["bytes_opt_state_per_device"] == 2 * r["bytes_trainable_per_device"] + 8
    assert r["batch"]["mel"] == [8, 80, 4 * 64] and r["batch"]["frame_mask"] == [8, 64]


def test_bad_mesh_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "plan.py"), "--mesh", "fsdp=8,pipe=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0 and "pipe" in proc.stderr


@pytest.mark.slow
def test_full_preset_fsdp64_full_finetune(tmp_path: Path) -> None:
    """64 個模擬裝置、全參數微調（CPU 上編譯約半分鐘）。"""
    r = _run_plan(
        tmp_path,
        "--config",
        "phase0",
        "--config.preset=full",
        '--config.trainable=(".*",)',
        "--mesh",
        "fsdp=64",
        "--batch",
        "64",
        "--tpu",
        "v5p",
        timeout=900,
    )
    _, b_all = _expected(64)
    assert r["bytes_params_per_device"] == b_all
    assert r["bytes_opt_state_per_device"] == 2 * r["bytes_trainable_per_device"] + 8
