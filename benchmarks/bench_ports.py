"""移植模型的速度：JAX（jit）對 PyTorch（eager，transformers）在同一台機器、同一次執行中比較。

量三件事，皆印出比值（>1 表示 JAX 較快）：
- 小型 Qwen2（預設 4 層、寬 512、序列 512）前向時間；
- 貪婪解碼 tokens/s（我們的 KV 快取 `generate` 對 transformers `generate`）；
- Whisper 對數梅爾吞吐量（NumPy 與 jnp 版本對 `WhisperFeatureExtractor`），以音訊秒數／秒計。

用法：`python benchmarks/bench_ports.py [--layers 4 --hidden 512 --seq 512 --batch 1 --new 64]`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402

configure_cpu_simulation()  # 在匯入 JAX 之前

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from speakllm_jax.audio.constants import SAMPLE_RATE  # noqa: E402
from speakllm_jax.audio.features import log_mel_jnp, log_mel_np  # noqa: E402
from speakllm_jax.checkpoints.hf import load_qwen2  # noqa: E402
from speakllm_jax.models.qwen2 import generate  # noqa: E402


def _best(fn, repeats: int) -> float:
    """執行 `repeats` 次取最短時間（秒）；第一次另外先跑以排除編譯與暖機。"""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_qwen2(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = load_qwen2(tmp)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    ids_t = torch.as_tensor(ids)
    ids_j = jnp.asarray(ids, jnp.int32)

    fwd = jax.jit(lambda m, x: m(x))
    t_jax = _best(lambda: fwd(model, ids_j).block_until_ready(), args.repeats)
    with torch.inference_mode():
        t_pt = _best(lambda: ref(ids_t).logits, args.repeats)

    prompt = ids[:, :32]
    t_gen_jax = _best(lambda: generate(model, prompt, args.new), max(1, args.repeats // 2))
    with torch.inference_mode():
        t_gen_pt = _best(
            lambda: ref.generate(
                torch.as_tensor(prompt),
                attention_mask=torch.ones_like(torch.as_tensor(prompt)),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
            ),
            max(1, args.repeats // 2),
        )
    toks = args.batch * args.new
    return [
        (f"Qwen2 前向（{args.layers} 層、寬 {args.hidden}、序列 {args.seq}）秒", t_jax, t_pt),
        ("貪婪解碼 tokens/s", toks / t_gen_jax, toks / t_gen_pt),
    ]


def bench_log_mel(args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    rng = np.random.default_rng(0)
    seconds = args.mel_seconds
    waves = [
        rng.standard_normal(int(SAMPLE_RATE * seconds)).astype(np.float32) * 0.1 for _ in range(8)
    ]
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    total = seconds * len(waves)

    def ours_np() -> None:
        for w in waves:
            log_mel_np(w, n_mels=80, pad_to_seconds=30.0)

    batch = jnp.asarray(np.stack(waves))
    mel_j = jax.jit(lambda x: log_mel_jnp(x, n_mels=80, pad_to_seconds=30.0))

    def ours_jnp() -> None:
        mel_j(batch).block_until_ready()

    def reference() -> None:
        for w in waves:
            fe(w, sampling_rate=SAMPLE_RATE, return_tensors="np")

    t_np = _best(ours_np, args.repeats)
    t_jnp = _best(ours_jnp, args.repeats)
    t_ref = _best(reference, args.repeats)
    return [("對數梅爾 音訊秒/秒（30 s 補齊）", total / t_np, total / t_jnp, total / t_ref)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mel_seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"裝置：JAX {jax.devices()[0].platform} ×{jax.device_count()}，torch 執行緒 {torch.get_num_threads()}"
    )
    print(f"{'項目':<44}{'JAX':>12}{'PyTorch':>12}{'比值':>8}")
    for name, ours, ref in bench_qwen2(args):
        # 時間越小越好、吞吐越大越好：比值一律寫成「JAX 快幾倍」。
        ratio = ref / ours if name.endswith("秒") else ours / ref
        print(f"{name:<44}{ours:>12.4f}{ref:>12.4f}{ratio:>8.2f}")
    for name, o_np, o_jnp, ref in bench_log_mel(args):
        print(f"{name:<44}{'np ' + format(o_np, '.1f'):>12}{ref:>12.1f}{o_np / ref:>8.2f}")
        print(
            f"{'  （jnp、jit、批次 8）':<44}{'jnp ' + format(o_jnp, '.1f'):>12}{ref:>12.1f}{o_jnp / ref:>8.2f}"
        )


if __name__ == "__main__":
    main()
