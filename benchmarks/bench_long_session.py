"""長對話基準：加速（快於即時）驅動一段很長的會話經 `Streamer`，印出各時間點的每幀計算與記憶體。

每 40 ms 一幀：餵 640 個樣本（增量梅爾 → 區塊編碼器 → LLM 一幀 → 深度 Transformer），與服務端
同樣的幀語意，只是不等真實時間。在 `--marks` 指定的分鐘數附近量最近 `--window` 幀的平均每幀
計算時間，並記錄行程 RSS 與 Streamer 的快取大小。

    python benchmarks/bench_long_session.py --minutes 30 --marks 1,10,30

`--session` 改為驅動服務端的 `DuplexSession`（同一個 `Streamer` 加上輪替策略與 Voila 解碼）：
每 5 秒一次使用者發言（espeak-ng 中文 1.2 秒 + 靜音），vad 策略下助理每次回 3 秒。
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.serving.session import DuplexSession, SessionSettings, load_engine  # noqa: E402
from export.tokenizers.voila import make_demo_voila_tokenizer  # noqa: E402
from export.torch_model import Streamer, load_exported  # noqa: E402
from speakllm_jax.audio.constants import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.data.demo_corpus import synth  # noqa: E402

FRAMES_PER_MINUTE = FRAME_RATE * 60


def _rss_mb() -> float:
    """目前行程的常駐記憶體（MB，讀 /proc；不可用時為最高水位）。"""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_tiny_export(out: Path, sinks: int, window: int, left_chunks: int) -> Path:
    """tiny 隨機模型（voila 語音頭）匯出到 `out`，使用給定的長對話方案。"""
    # 延後匯入：JAX／Flax 要在 main 呼叫 configure_cpu_simulation() 之後才載入
    from flax import nnx

    from configs.models import model_config
    from export.to_torch import export_model
    from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config

    mc = model_config("tiny")
    mc.speech_head = "voila"
    mc.streaming.encoder_left_chunks = left_chunks
    mc.streaming.llm_sink_frames = sinks
    mc.streaming.llm_window_frames = window
    export_model(SpeakLLM(build_speakllm_config(mc), rngs=nnx.Rngs(0)), out, parity_seed=None)
    return out


def run(
    model_dir: Path, minutes: float, marks: list[float], window: int, chunk_frames: int = 2
) -> list[dict]:
    """跑 `minutes` 分鐘的加速會話，回傳每個量測點的結果。"""
    torch.set_num_threads(1)
    tm = load_exported(model_dir)
    st = Streamer(tm, chunk_frames)
    rng = np.random.default_rng(0)
    q, k = tm.cfg.num_codebooks, tm.cfg.max_chars_per_token
    prev = {
        "text": torch.zeros((1, 1), dtype=torch.long),
        "tones": torch.zeros((1, 1, k), dtype=torch.long),
        "codes": torch.zeros((1, 1, q), dtype=torch.long),
        "codes_valid": torch.zeros((1, 1), dtype=torch.bool),
    }
    total = int(minutes * FRAMES_PER_MINUTE)
    targets = sorted(int(m * FRAMES_PER_MINUTE) for m in marks)
    times: list[float] = []
    results = []
    for f in range(total):
        t0 = time.perf_counter()
        user = st.push_audio((0.1 * rng.standard_normal(FRAME_SAMPLES)).astype(np.float32))
        for i in range(user.shape[1]):
            out = st.step(user[:, i : i + 1], prev)
            prev = {**prev, "text": out["text"].argmax(-1), "codes": out["code_ids"].long()}
        times.append(time.perf_counter() - t0)
        if targets and f + 1 >= targets[0]:
            targets.pop(0)
            recent = times[-window:]
            results.append(
                {
                    "minute": (f + 1) / FRAMES_PER_MINUTE,
                    "ms_per_frame": 1000.0 * float(np.mean(recent)),
                    "rss_mb": _rss_mb(),
                    **st.cache_sizes(),
                }
            )
            print(
                f"第 {results[-1]['minute']:.2f} 分鐘：每幀 {results[-1]['ms_per_frame']:.2f} ms，"
                f"RSS {results[-1]['rss_mb']:.0f} MB，快取 {st.cache_sizes()}",
                flush=True,
            )
    return results


def run_session(
    model_dir: Path, voila_dir: Path, minutes: float, marks: list[float], window: int
) -> list[dict]:
    """跑 `minutes` 分鐘的加速 `DuplexSession`（vad 策略），回傳每個量測點的結果。"""
    torch.set_num_threads(1)
    session = DuplexSession(load_engine(model_dir, voila_dir), SessionSettings(policy="vad"))
    period = 125  # 5 秒
    block = np.zeros(period * FRAME_SAMPLES, np.float32)
    speech = synth("今天天氣很好，我們去公園散步吧。", "cmn")[: int(1.2 * SAMPLE_RATE)]
    block[: len(speech)] = speech
    total = int(minutes * FRAMES_PER_MINUTE)
    targets = sorted(int(m * FRAMES_PER_MINUTE) for m in marks)
    times: list[float] = []
    audio = 0
    results = []
    for f in range(total):
        lo = (f % period) * FRAME_SAMPLES
        t0 = time.perf_counter()
        msgs = session.feed(block[lo : lo + FRAME_SAMPLES])
        times.append(time.perf_counter() - t0)
        audio += sum(m.WhichOneof("payload") == "audio" for m in msgs)
        if targets and f + 1 >= targets[0]:
            targets.pop(0)
            res = {
                "minute": (f + 1) / FRAMES_PER_MINUTE,
                "ms_per_frame": 1000.0 * float(np.mean(times[-window:])),
                "rss_mb": _rss_mb(),
                "turns": session.turn_count,
                "audio_frames": audio,
                **session.cache_sizes(),
            }
            results.append(res)
            print(
                f"第 {res['minute']:.2f} 分鐘：每幀 {res['ms_per_frame']:.2f} ms，"
                f"RSS {res['rss_mb']:.0f} MB，{res['turns']} 輪、{audio} 幀助理音訊，"
                f"快取 {session.cache_sizes()}",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--marks", default="1,10,30", help="量測點（分鐘，逗號分隔）")
    p.add_argument("--window", type=int, default=500, help="每個量測點平均的幀數")
    p.add_argument("--model_dir", default="", help="匯出的模型資料夾；空白時建 tiny 隨機模型")
    p.add_argument("--llm_sink_frames", type=int, default=4)
    p.add_argument("--llm_window_frames", type=int, default=3000)
    p.add_argument("--encoder_left_chunks", type=int, default=100)
    p.add_argument("--session", action="store_true", help="驅動 DuplexSession（含輪替與解碼）")
    a = p.parse_args(argv)
    configure_cpu_simulation()
    try:
        marks = [float(m) for m in a.marks.split(",") if m.strip()]
    except ValueError:
        print(f"錯誤：--marks={a.marks!r} 不是逗號分隔的數字", file=sys.stderr)
        return 2
    if a.minutes <= 0 or not marks or max(marks) > a.minutes:
        print(f"錯誤：--marks 必須落在 (0, --minutes={a.minutes}] 內", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(a.model_dir)
            if a.model_dir
            else build_tiny_export(
                Path(tmp) / "tiny", a.llm_sink_frames, a.llm_window_frames, a.encoder_left_chunks
            )
        )
        if a.session:
            voila_dir = Path(tmp) / "voila"
            make_demo_voila_tokenizer(voila_dir, seed=0)
            res = run_session(model_dir, voila_dir, a.minutes, marks, a.window)
        else:
            res = run(model_dir, a.minutes, marks, a.window)
    first, last = res[0], res[-1]
    print(
        f"每幀計算 第 {last['minute']:.1f} 分 / 第 {first['minute']:.1f} 分 = "
        f"{last['ms_per_frame'] / first['ms_per_frame']:.2f}×；RSS 增加 "
        f"{last['rss_mb'] - first['rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
