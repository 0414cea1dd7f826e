"""訓練步吞吐量：小型 Qwen2 的 jit 訓練步（tokens/s、MFU），同一次執行中對照 PyTorch。

python benchmarks/bench_train_step.py [--layers 4 --hidden 512 --heads 8 --kv_heads 4
    --intermediate 1408 --vocab 32000 --seq 512 --batch 4 --steps 5]

JAX：`speakllm_jax.models.qwen2.Qwen2ForCausalLM`，文字語言模型損失（下一詞交叉熵），
全參數以 optax AdamW 更新，整步 `jax.jit`（狀態捐贈）。MFU = 模型 FLOPs/s ÷ 本機以大型 fp32
矩陣乘法量得的峰值；模型 FLOPs 每詞 = 6 × 矩陣參數數（不含嵌入查表）+ 12 × 層數 × 寬度 × 序列長。
對照組：`transformers.Qwen2ForCausalLM`（同設定、fp32、CPU）+ `torch.optim.AdamW`。
兩邊在同一個程序中交替量測（機器負載起伏同樣影響兩者）。
比值 = PyTorch 每步秒數 ÷ JAX 每步秒數（> 1 表示 JAX 較快）。只印表，不做斷言。
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """大型 fp32 矩陣乘法（jit）的 GFLOP/s，作為本機峰值。"""
    # 延後匯入：JAX／Flax 要在 main 呼叫 configure_cpu_simulation() 之後才載入
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def model_flops_per_step(args: argparse.Namespace, matmul_params: int) -> float:
    tokens = args.batch * args.seq
    attn = 12 * args.layers * args.hidden * args.seq
    return (6 * matmul_params + attn) * tokens


def make_jax_step(args: argparse.Namespace) -> tuple[Callable[[], None], int, int, float]:
    """回傳 (執行一步並等待完成的函式, 參數總數, 矩陣參數數, 首步編譯秒數)。"""
    # 延後匯入：JAX／Flax 要在 main 呼叫 configure_cpu_simulation() 之後才載入
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        max_position_embeddings=max(args.seq, 512),
    )
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    matmul = n_params - args.vocab * args.hidden  # 嵌入查表不是矩陣乘法
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def loss_fn(p: dict, ids: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, p)
        logits = m(ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
        return jnp.mean(nll)

    def step(p: dict, o: dict, ids: jax.Array) -> tuple:
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)
    state = {"p": params, "o": tx.init(params)}

    def run() -> None:
        state["p"], state["o"], loss = jitted(state["p"], state["o"], ids)
        loss.block_until_ready()

    t0 = time.perf_counter()
    run()
    return run, n_params, matmul, time.perf_counter() - t0


def make_torch_step(args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """transformers 的 Qwen2ForCausalLM + AdamW，CPU fp32；回傳 (執行一步的函式, 參數數)。"""
    # 延後匯入：--no_torch 時不載入 PyTorch 與 transformers
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        max_position_embeddings=max(args.seq, 512),
        use_cache=False,
    )
    model = Qwen2ForCausalLM(cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids[:, :-1])
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        loss = -logp.gather(-1, ids[:, 1:, None]).mean()
        loss.backward()
        opt.step()

    run()
    return run, n_params


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no_torch", action="store_true", help="不跑 PyTorch 對照組")
    args = p.parse_args(argv)
    configure_cpu_simulation()

    # 延後匯入：JAX／Flax 要在 main 呼叫 configure_cpu_simulation() 之後才載入
    import jax

    peak = matmul_peak_gflops()
    jax_run, n_params, matmul, compile_s = make_jax_step(args)
    torch_run = None
    if not args.no_torch:
        torch_run, t_params = make_torch_step(args)
        if t_params != n_params:
            print(f"注意：PyTorch 參數數 {t_params:,} 與 JAX {n_params:,} 不同")
    for _ in range(args.warmup):
        jax_run()
        if torch_run is not None:
            torch_run()
    # 兩邊交替量測，讓機器負載的起伏同樣影響兩者。
    times: list[float] = []
    t_times: list[float] = []
    for _ in range(args.steps):
        times.append(timed(jax_run))
        if torch_run is not None:
            t_times.append(timed(torch_run))
    peak = max(peak, matmul_peak_gflops())
    jax_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = model_flops_per_step(args, matmul)
    mfu = flops / jax_s / 1e9 / peak
    fmt = ", ".join
    rows = [
        ("裝置", f"{jax.devices()[0].platform} × {jax.device_count()}（{os.cpu_count()} 核）"),
        (
            "模型",
            f"Qwen2 {args.layers} 層 d{args.hidden} {args.heads}/{args.kv_heads} 頭 "
            f"ffn{args.intermediate} 詞表{args.vocab}",
        ),
        ("參數", f"{n_params:,}（矩陣 {matmul:,}）"),
        ("批次", f"{args.batch} × {args.seq} = {tokens} 詞"),
        ("fp32 矩陣乘法峰值", f"{peak:.1f} GFLOP/s（2048³ jit，前後各量一次取高）"),
        ("模型 FLOPs／步", f"{flops / 1e9:.1f} GFLOP"),
        ("JAX 首步（含編譯）", f"{compile_s:.2f} s"),
        ("JAX 每步 中位數／最小", f"{jax_s:.3f} s / {min(times):.3f} s"),
        ("JAX 各步", fmt(f"{t:.3f}" for t in times)),
        ("JAX tokens/s（中位數）", f"{tokens / jax_s:,.0f}"),
        ("JAX 達成 GFLOP/s", f"{flops / jax_s / 1e9:.1f}"),
        (
            "MFU（對本機峰值）",
            f"{100 * mfu:.1f}%（最小步時 {100 * flops / min(times) / 1e9 / peak:.1f}%）",
        ),
    ]
    if t_times:
        torch_s = statistics.median(t_times)
        rows += [
            ("PyTorch 每步 中位數／最小", f"{torch_s:.3f} s / {min(t_times):.3f} s"),
            ("PyTorch 各步", fmt(f"{t:.3f}" for t in t_times)),
            ("PyTorch tokens/s（中位數）", f"{tokens / torch_s:,.0f}"),
            (
                "比值 PyTorch÷JAX 步時",
                f"{torch_s / jax_s:.2f}×（中位數）  {min(t_times) / min(times):.2f}×（最小）",
            ),
        ]
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k:<{width}}{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
