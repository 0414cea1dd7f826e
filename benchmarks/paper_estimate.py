"""H100 紙上估算：full 預設（Whisper-medium 串流編碼器區塊 + Qwen2.5-7B 幀步 + 深度 Transformer／頭）
在批次 1／8／32／64 時每 40 ms 幀的 FLOPs、搬移的位元組（權重 + KV）與時間，以及單張 GPU 能即時
服務的會話數。

模型尺寸全部來自設定（`configs.models.model_config("full")`）：參數量由 `nnx.eval_shape` 建出的
抽象模型逐模組加總（不配置記憶體），注意力與 KV 的尺寸、編碼器左方脈絡、LLM 注意力槽與視窗來自
同一份設定。批次 B 的一步 = B 個會話各前進一幀（批次排程的一個 tick）：

- 計算：LLM 2 × (各層 + lm_head + 頭) 參數 + 注意力 4 × 層數 × 寬 × 上下文（上下文以槽 + 視窗為上限）；
  深度 Transformer 逐碼本一個位置（KV 快取）；Whisper 編碼器每幀分攤 2 個編碼器框與其對左方
  `encoder_left_chunks` 個區塊的注意力；連接器。全部 × B。
- 記憶體：權重每步讀一次，與 B 無關（編碼器與連接器每區塊一次、深度 Transformer 每碼本一趟）；
  LLM KV 與編碼器 KV 每個會話各讀一次（× B）。
- 每步時間 = max(計算 ÷ 989 TFLOP/s, 位元組 ÷ 3.35 TB/s)（H100 SXM bf16 峰值；實際利用率通常
  60–80%，時間要相應放大）；≤ 40 ms 就跟得上即時。能即時服務的會話數 = 每步時間 ≤ 40 ms 且權重 +
  所有會話的 KV 放得進 80 GB 的最大 B。

用法：`python benchmarks/paper_estimate.py [--batches 1,8,32,64] [--context-seconds 30]
[--utilization 1.0] [--json out.json]`（需要 JAX；數秒）。
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_HBM_BYTES = 80e9
FRAME_MS = 40.0
BF16 = 2  # 每個數的位元組
DEFAULT_BATCHES = (1, 8, 32, 64)


def model_dims(preset: str = "full") -> dict[str, Any]:
    """設定中的模型尺寸與逐模組的參數量（抽象模型，不配置記憶體）。"""
    # 延後匯入：JAX／Flax 要等入口呼叫 configure_cpu_simulation() 之後才載入（bench_serving 也匯入本模組）
    import numpy as np
    from flax import nnx

    from configs.models import model_config
    from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config

    mc = model_config(preset)
    mc.speech_head = "voila"
    cfg = build_speakllm_config(mc)
    abstract = nnx.eval_shape(lambda: SpeakLLM(cfg, rngs=nnx.Rngs(0)))
    counts: Counter = Counter()
    for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        n = int(np.prod(v.get_value().shape))
        counts[str(path[0])] += n
        if str(path[0]) == "llm":
            counts[f"llm/{path[1]}"] += n
    qw, wh, sp, st = mc.qwen, mc.whisper, mc.speech, mc.streaming
    return {
        "preset": preset,
        "params": dict(counts),
        "params_total": sum(v for k, v in counts.items() if "/" not in k),
        "llm_layers": qw.num_hidden_layers,
        "llm_hidden": qw.hidden_size,
        "llm_heads": qw.num_attention_heads,
        "llm_kv_heads": qw.num_key_value_heads,
        "enc_layers": wh.encoder_layers,
        "enc_d": wh.d_model,
        "num_codebooks": sp.num_codebooks,
        "connector_stack": int(mc.connector.stack),
        "chunk_frames": st.chunk_frames,
        "encoder_left_chunks": st.encoder_left_chunks,
        "llm_sink_frames": st.llm_sink_frames,
        "llm_window_frames": st.llm_window_frames,
    }


def step_cost(dims: dict[str, Any], batch: int, ctx_frames: int) -> dict[str, Any]:
    """批次 `batch` 的一步（每個會話一幀）的 FLOPs、位元組與 H100 時間。"""
    p = dims["params"]
    b = int(batch)
    window = dims["llm_window_frames"]
    ctx = min(ctx_frames, dims["llm_sink_frames"] + window) if window > 0 else ctx_frames
    llm_matmul = p["llm/layers"] + p["llm/lm_head"] + p["turn_head"] + p["tone_head"]
    head_dim = dims["llm_hidden"] // dims["llm_heads"]
    kv_frame = 2 * dims["llm_layers"] * dims["llm_kv_heads"] * head_dim * BF16
    enc_frames = 2  # 梅爾 100 Hz → 卷積步幅 2 → 50 Hz：一個 LLM 幀 = 2 個編碼器框
    chunk = dims["chunk_frames"]
    c = chunk * dims["connector_stack"]  # 一個區塊的編碼器框數
    enc_ctx = (dims["encoder_left_chunks"] + 1) * c  # 每框看自己的區塊與左方 L 個區塊
    enc_kv_session = 2 * dims["enc_layers"] * dims["encoder_left_chunks"] * c * dims["enc_d"] * BF16
    q = dims["num_codebooks"]
    flops = {
        "llm": b * (2 * llm_matmul + 4 * dims["llm_layers"] * dims["llm_hidden"] * ctx),
        "depth": b * 2 * p["speech_head"] * q,
        "encoder": b
        * enc_frames
        * (2 * p["encoder"] + 4 * dims["enc_layers"] * dims["enc_d"] * enc_ctx),
        "connector": b * 2 * p["connector"],
    }
    bytes_ = {
        "weights_llm": BF16 * llm_matmul,
        "weights_depth": BF16 * p["speech_head"] * q,
        "weights_encoder": BF16 * (p["encoder"] + p["connector"]) / chunk,
        "kv_llm": b * kv_frame * ctx,
        "kv_encoder": b * enc_kv_session / chunk,
    }
    f, m = sum(flops.values()), sum(bytes_.values())
    t_c = f / H100_BF16_FLOPS * 1000.0
    t_m = m / H100_HBM_BYTES_PER_S * 1000.0
    resident = BF16 * dims["params_total"] + b * (kv_frame * ctx + enc_kv_session)
    return {
        "batch": b,
        "ctx_frames": ctx,
        "flops": flops,
        "bytes": bytes_,
        "gflops": f / 1e9,
        "gflops_per_session": f / b / 1e9,
        "gbytes": m / 1e9,
        "compute_ms": t_c,
        "memory_ms": t_m,
        "step_ms": max(t_c, t_m),
        "realtime": max(t_c, t_m) <= FRAME_MS and resident <= H100_HBM_BYTES,
        "resident_gb": resident / 1e9,
        "kv_bytes_per_frame": kv_frame,
    }


def max_sessions(dims: dict[str, Any], ctx_frames: int, utilization: float = 1.0) -> int:
    """每步時間（÷ 利用率）≤ 40 ms 且放得進 80 GB 的最大批次。"""
    lo = 0
    b = 1
    while b < 1 << 16:
        r = step_cost(dims, b, ctx_frames)
        if r["step_ms"] / utilization > FRAME_MS or r["resident_gb"] * 1e9 > H100_HBM_BYTES:
            break
        lo = b
        b += 1
    return lo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--batches",
        default=",".join(map(str, DEFAULT_BATCHES)),
        help="批次（同時會話數，逗號分隔）",
    )
    p.add_argument("--context-seconds", type=float, default=30.0, help="每個會話的對話長度")
    p.add_argument("--utilization", type=float, default=1.0, help="峰值利用率（0–1）")
    p.add_argument("--preset", default="full")
    p.add_argument("--json", default="", help="另寫成 JSON")
    args = p.parse_args(argv)
    dims = model_dims(args.preset)
    ctx = round(args.context_seconds * 1000 / FRAME_MS)
    rows = [step_cost(dims, int(b), ctx) for b in args.batches.split(",") if b.strip()]
    best = max_sessions(dims, ctx, args.utilization)
    print(
        f"H100 SXM paper estimate: {args.preset} preset, {dims['params_total'] / 1e9:.2f} B params, "
        f"bf16, {args.context_seconds:g} s context (LLM KV {rows[0]['ctx_frames']} frames, "
        f"{rows[0]['kv_bytes_per_frame'] / 1e3:.0f} kB/frame), chunk_frames={dims['chunk_frames']}"
    )
    head = ["batch", "GFLOP/step", "GFLOP/session", "GB moved", "compute ms", "memory ms"]
    head += ["step ms", "of 40 ms", "HBM GB", "real time"]
    print(" | ".join(head))
    for r in rows:
        print(
            f"{r['batch']} | {r['gflops']:.1f} | {r['gflops_per_session']:.2f} | {r['gbytes']:.2f} | "
            f"{r['compute_ms']:.3f} | {r['memory_ms']:.2f} | {r['step_ms']:.2f} | "
            f"{r['step_ms'] / FRAME_MS * 100:.0f}% | {r['resident_gb']:.1f} | "
            f"{'yes' if r['realtime'] else 'no'}"
        )
    r0 = rows[0]
    print("per-session FLOPs: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in r0["flops"].items()))
    print("bytes at batch 1: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in r0["bytes"].items()))
    print(
        f"sessions per GPU in real time (step ≤ 40 ms at {args.utilization:.0%} of peak, "
        f"weights + KV ≤ 80 GB): {best}"
    )
    if args.json:
        out = {"dims": dims, "rows": rows, "max_realtime_sessions": best}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
