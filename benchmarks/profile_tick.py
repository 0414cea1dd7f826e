"""批次排程一個 tick 的 CPU 時間（`time.process_time`，共用機器上不受別的行程影響），依階段拆開。

以示範資產（隨機 tiny 模型 + 示範 Voila 解碼器）建 `--sessions` 個會話，像伺服器的 `_run_tick`
一樣每個 tick 每個會話餵一幀（`feed(defer=True)`：快速路徑）再 `step_sessions` 一批前進，量
`--ticks` 個 tick。兩種情境：

- `speaking`：每個會話先說一句（約 1 秒）再靜音，等所有會話的助理都在說話（`max_reply_seconds`
  調長，量測期間不結束）才開始量；每 tick 每個會話一幀 Voila 解碼。
- `listening`：使用者一直說話（同一句反覆），助理不開口；沒有解碼。

會話的開始時間錯開（第 i 個會話晚 i mod `chunk_frames` 個 tick 開始），編碼器區塊不會全部落在同一個
tick。每個階段以 process_time 包住對應的函式（不改程式本身）：快速路徑（`DuplexSession.feed`，
其中 VAD `_voiced` 與增量梅爾 `IncrementalLogMel.push`）、編碼器（`encode_batch`）、LLM 幀步
（`step_batch`，其中 LLM 本體、`lm_head`）、深度 Transformer（`depth_generate`：voila 只替說話的幀、
在模型步之後；在 `step_batch` 裡面跑的那部分算進幀步）、Voila 解碼（`DuplexSession.decode`）；
其餘（輪替策略、送出訊息）歸「其他」。印出每個階段每 tick 的 p50／p90（ms）與 load average。

用法：`python benchmarks/profile_tick.py [--sessions 32] [--ticks 40] [--scenario both]
[--cprofile] [--assets-dir DIR] [--json out.json]`（tiny 模型、2 核 CPU 約 1–2 分鐘）。
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import export.serving.session as session_mod  # noqa: E402
import export.torch_model as torch_model  # noqa: E402
from configs.serving import get_config  # noqa: E402
from export.demo_assets import build_demo_assets  # noqa: E402
from export.serving.session import (  # noqa: E402
    FRAME_SAMPLES,
    DuplexSession,
    SessionSettings,
    load_engine,
    step_sessions,
)
from speakllm_jax.audio.constants import SAMPLE_RATE  # noqa: E402
from speakllm_jax.audio.features import IncrementalLogMel  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.data.demo_corpus import synth  # noqa: E402

# 階段（顯示順序）：名稱 → 說明；「子階段」包含在它上面那一列裡。
STAGES = {
    "tick": "一個 tick 合計",
    "fast": "快速路徑（feed）",
    "vad": "  VAD（webrtcvad + 能量）",
    "logmel": "  增量梅爾",
    "encode": "編碼器（encode_batch）",
    "step": "LLM 幀步（step_batch）",
    "llm": "  LLM 本體",
    "lm_head": "  lm_head",
    "step_rest": "  其餘（輸入、快取、輪替頭）",
    "depth": "深度 Transformer（只替說話的幀，`fill_codes`）",
    "decode": "Voila 解碼",
    "other": "其他（策略、訊息）",
}


class StageTimer:
    """以 process_time 累計各階段在目前 tick 內的時間（同名巢狀呼叫只算最外層）。"""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.in_step: dict[str, float] = defaultdict(float)  # 在 step_batch 裡面花的時間
        self.ticks: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth[name] += 1
            self.calls[name] += 1
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[name] -= 1
                if not self.depth[name]:
                    spent = time.process_time() - t0
                    self.now[name] += spent
                    if name != "step" and self.depth["step"]:
                        self.in_step[name] += spent

        return timed

    def end_tick(self, total: float) -> None:
        d = dict(self.now)
        d["tick"] = total
        d["rounds"] = self.calls.get("step", 0)
        # 深度 Transformer 平常在 step_batch 之後（只替說話的幀）；舊版或 cosyvoice2 在裡面。
        inner = sum(d.get(k, 0.0) for k in ("llm", "lm_head")) + self.in_step["depth"]
        d["step_rest"] = d.get("step", 0.0) - inner
        outside = d.get("depth", 0.0) - self.in_step["depth"]
        top = sum(d.get(k, 0.0) for k in ("fast", "encode", "step", "decode"))
        d["other"] = total - top - outside
        self.ticks.append(d)
        self.now.clear()
        self.calls.clear()
        self.in_step.clear()


def instrument(engine: Any, timer: StageTimer) -> None:
    """把各階段的函式換成計時版本（只在這個行程裡）。"""
    model = engine.model
    session_mod.encode_batch = timer.wrap("encode", session_mod.encode_batch)
    session_mod.step_batch = timer.wrap("step", session_mod.step_batch)
    DuplexSession.feed = timer.wrap("fast", DuplexSession.feed)
    DuplexSession._voiced = timer.wrap("vad", DuplexSession._voiced)
    DuplexSession.decode = timer.wrap("decode", DuplexSession.decode)
    IncrementalLogMel.push = timer.wrap("logmel", IncrementalLogMel.push)
    model.llm.model.forward = timer.wrap("llm", model.llm.model.forward)
    pool = getattr(torch_model, "SlotCache", None)  # 舊版沒有常駐快取（比較前後用同一個腳本）
    if pool is not None:
        pool.step = timer.wrap("llm", pool.step)
    model.llm.lm_head.forward = timer.wrap("lm_head", model.llm.lm_head.forward)
    screened = getattr(torch_model, "ScreenedArgmax", None)  # 服務路徑的文字 argmax（舊版沒有）
    if screened is not None:
        screened.__call__ = timer.wrap("lm_head", screened.__call__)
    model.depth_generate = timer.wrap("depth", model.depth_generate)


def make_sessions(engine: Any, n: int, max_reply_seconds: float) -> list[DuplexSession]:
    s = SessionSettings.from_config(get_config())
    s.max_reply_seconds = max_reply_seconds
    return [DuplexSession(engine, SessionSettings(**vars(s))) for _ in range(n)]


def tick(sessions: list[DuplexSession], frames: list[np.ndarray | None]) -> int:
    """伺服器 `_run_tick` 的做法：各會話餵一幀（None：還沒開始），再一批前進；回傳這一 tick
    說話的會話數。"""
    for s, fr in zip(sessions, frames, strict=True):
        if fr is not None:
            s.feed(fr, 0.0, defer=True)
    _, errors = step_sessions(sessions)
    if errors:
        raise RuntimeError(f"step_sessions 出錯：{next(iter(errors.values()))!r}")
    return sum(s.turn is not None for s in sessions)


def run_scenario(
    engine: Any, scenario: str, n: int, ticks: int, timer: StageTimer, prof: Any
) -> dict[str, Any]:
    speech = synth("你好，請幫我查一下天氣。", "cmn")[:SAMPLE_RATE]
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    chunk = int(get_config().chunk_frames)
    sessions = make_sessions(engine, n, max_reply_seconds=60.0)
    lead = [i % chunk for i in range(n)]
    speech_frames = [speech[i : i + FRAME_SAMPLES] for i in range(0, len(speech), FRAME_SAMPLES)]
    speech_frames = [f for f in speech_frames if len(f) == FRAME_SAMPLES]

    def frame_for(i: int, k: int) -> np.ndarray | None:
        j = k - lead[i]
        if j < 0:
            return None
        if scenario == "listening":
            return speech_frames[j % len(speech_frames)]
        return speech_frames[j] if j < len(speech_frames) else silence

    k = 0
    # 暖身：speaking 等到所有會話的助理都在說話，listening 跑滿一句。
    while True:
        speaking = tick(sessions, [frame_for(i, k) for i in range(n)])
        k += 1
        if scenario == "speaking" and speaking == n and k > len(speech_frames) + 12:
            break
        if scenario == "listening" and k > len(speech_frames) + 4:
            break
        if k > 400:
            raise RuntimeError(f"暖身 {k} 個 tick 後只有 {speaking}/{n} 個會話在說話")
    timer.ticks.clear()
    timer.now.clear()
    timer.calls.clear()
    counts = []
    for _ in range(ticks):
        frames = [frame_for(i, k) for i in range(n)]
        if prof is not None:
            prof.enable()
        t0 = time.process_time()
        counts.append(tick(sessions, frames))
        total = time.process_time() - t0
        if prof is not None:
            prof.disable()
        timer.end_tick(total)
        k += 1
    stats = {}
    for name in STAGES:
        v = np.array([t.get(name, 0.0) for t in timer.ticks]) * 1000.0
        stats[name] = {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
    return {
        "scenario": scenario,
        "sessions": n,
        "ticks": ticks,
        "speaking_min": int(min(counts)),
        "speaking_max": int(max(counts)),
        "stages_ms": stats,
        "per_session_frame_ms": stats["tick"]["p50"] / n,
        "rounds_per_tick": [int(t["rounds"]) for t in timer.ticks],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    heads = [f"{r['scenario']} p50 / p90" for r in results]
    print("| 階段（ms CPU／tick） | " + " | ".join(heads) + " |")
    print("| --- | " + " | ".join("---" for _ in results) + " |")
    for name, label in STAGES.items():
        cells = [
            f"{r['stages_ms'][name]['p50']:.1f} / {r['stages_ms'][name]['p90']:.1f}"
            for r in results
        ]
        print(
            f"| {label.strip() if not label.startswith('  ') else '└ ' + label.strip()} | "
            + " | ".join(cells)
            + " |"
        )
    for r in results:
        print(
            f"{r['scenario']}: {r['sessions']} 個會話、{r['ticks']} 個 tick，說話的會話 "
            f"{r['speaking_min']}–{r['speaking_max']}；每會話幀 {r['per_session_frame_ms']:.2f} ms；"
            f"每 tick 的批次輪數 {sorted(set(r['rounds_per_tick']))}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--scenario", choices=("speaking", "listening", "both"), default="both")
    ap.add_argument("--assets-dir", default="/tmp/speakllm_profile_tick_assets")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=int(get_config().torch_threads),
        help="torch 的執行緒數（預設同伺服器設定 torch_threads）",
    )
    ap.add_argument(
        "--cprofile", action="store_true", help="另印 cProfile 的前 45 名（排序見 --sort）"
    )
    ap.add_argument("--sort", default="cumulative", help="cProfile 的排序（cumulative、tottime…）")
    ap.add_argument("--json", default="", help="結果另存成 JSON")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.ticks < 1:
        print("錯誤：--sessions 與 --ticks 必須 ≥ 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.torch_threads))
    configure_cpu_simulation()  # 示範模型以 JAX 建立
    engine = load_engine(*build_demo_assets(args.assets_dir))
    timer = StageTimer()
    instrument(engine, timer)
    scenarios = ["speaking", "listening"] if args.scenario == "both" else [args.scenario]
    results = []
    for sc in scenarios:
        prof = cProfile.Profile() if args.cprofile else None
        results.append(run_scenario(engine, sc, args.sessions, args.ticks, timer, prof))
        if prof is not None:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(args.sort).print_stats(45)
            print(f"--- cProfile（{sc}）---\n{buf.getvalue()}")
    load = os.getloadavg()
    print(f"torch threads={torch.get_num_threads()}；load average {load[0]:.2f} {load[1]:.2f}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"load": load, "results": results}, ensure_ascii=False, indent=1),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
