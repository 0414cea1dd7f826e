"""全雙工服務的效能：真實 gRPC 伺服器（127.0.0.1、子行程）、隨機初始化的 tiny 示範模型、真實語音。

量三件事並印成表格（不做斷言）：

- 服務端到端，在 1、4、8 個同時會話下的 p50／p90／p99（客戶端量測）：
  首包延遲（送出第 f 幀輸入 → 收到第 f 幀助理音訊，f 為每輪第一個音訊幀）；
  打斷停止延遲（從送出的音訊中使用者插話的語音起點，到之後收到的最後一個助理音訊樣本：
  以音訊時間軸計，並另列牆鐘時間）；即時率（伺服器每輪計算 ÷ 音訊長度、即時送出時的
  串流牆鐘 ÷ 音訊長度，以及 `--fast` 盡快送出時的處理即時率）。
  每個會話送同一段約 3.8 秒的片段：espeak-ng 中文一句 1.2 秒 → 靜音（助理開口）→
  助理開口後第 `--barge-offset` 幀插入 1 秒使用者語音（打斷）→ 靜音（助理再開口一次）。
- 兩種語音頭的首包延遲（同一次執行）：voila（Voila-Tokenizer 逐幀解碼，16 kHz）對 cosyvoice2
  （talker 逐幀一個語音碼 → token2wav 串流，24 kHz），後者分別用 tiny token2wav 的分塊
  （`static_chunk_size=10`）與官方分塊（25，其餘同 tiny）；每個語音頭一個伺服器子行程、
  即時送出「一句話 + 靜音」，印出客戶端首包 p50 與對 voila 的比值。
- 每幀計算：PyTorch 孿生的 `frame_step` 對 JAX `_frame_step`（同一個匯出的 tiny 模型、
  自由執行、同樣的使用者串流輸入）。
- 全雙工手感，舊版對新版（`--feel`，同一次執行）：`--old-commit`（預設 `main`）的伺服器程式以
  `git archive` 解到暫存資料夾、與本工作樹的伺服器各開一個子行程，用同一組示範資產；每個同時數
  （`--feel-levels`，預設 1,4,8）即時送出同一段片段，量客戶端的：使用者最後一個語音幀送出 → 收到
  第一個助理音訊（ms）、打斷起點之後送到的助理音訊幀數、串流牆鐘 ÷ 音訊長度；另跑「1 個即時會話
  + 2 個盡快送出的會話」看即時會話的首包。
- 排程（`--sched`）：單一會話路徑（`scheduler=per_session`）對批次排程（`batched`），每個同時數
  （`--old-levels`、`--sched-levels`，預設 1,4,8,16 與 1,4,8,16,32,64）一個新的伺服器子行程，
  所有會話即時送出同一段片段，量客戶端的說完 → 首包 p50／p90／p99、打斷起點後送到的助理音訊幀數、
  串流即時率、錯誤數，伺服器關機時印出的 tick 計算時間，與同排程 1 個會話、單一會話路徑的比值；
  另跑「1 個即時 + `--fast-senders` 個盡快送出」；`--decode-modes stream,window` 同時比較 Voila 的
  串流解碼與舊的視窗重解；印出 load average（共用機器）。
- 紙上估算：`benchmarks/paper_estimate.py`（full 預設在 H100 SXM 上批次 1／8／32／64 的每幀
  FLOPs、位元組、時間與每張 GPU 能即時服務的會話數）；`--no-estimate` 略過。

用法：`python benchmarks/bench_serving.py [--concurrency 1,4,8] [--sessions 8] [--no-fast]
[--head-sessions 3] [--no-heads] [--frame-steps 100] [--assets-dir DIR] [--json out.json]`
（預設約 3–4 分鐘，2 核 CPU）。只比語音頭：`--no-serving --frame-steps 0`。
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from configs.serving import get_config  # noqa: E402
from export.cosyvoice2.flow import FLOW_TINY  # noqa: E402
from export.cosyvoice2.token2wav import TOKEN2WAV_CONFIG, save_random_token2wav  # noqa: E402
from export.demo_assets import build_demo_assets  # noqa: E402
from export.serving import duplex_pb2 as pb  # noqa: E402
from export.serving.client import StreamResult, stream_audio  # noqa: E402
from speakllm_jax.audio.constants import FRAME_SAMPLES, FRAME_SECONDS, SAMPLE_RATE  # noqa: E402
from speakllm_jax.audio.vad import frame_flags  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.data.demo_corpus import synth  # noqa: E402

SR = SAMPLE_RATE
SENTENCE = "請問明天早上的火車幾點出發，我想要買兩張票。"


# ---------------------------------------------------------------- 共用


def pct(xs: list[float]) -> tuple[float, float, float]:
    """p50、p90、p99（線性內插）；沒有樣本時為 NaN。"""
    if not xs:
        return (float("nan"),) * 3
    a = np.asarray(xs, np.float64)
    return tuple(float(np.percentile(a, q)) for q in (50, 90, 99))


def fmt_row(cells: list[Any], widths: list[int]) -> str:
    out = []
    for c, w in zip(cells, widths, strict=True):
        s = (
            f"{c:.3f}"
            if isinstance(c, float) and abs(c) < 10
            else (f"{c:.1f}" if isinstance(c, float) else str(c))
        )
        out.append(s.rjust(w))
    return "  ".join(out)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(h), 8) for h in header]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(fmt_row([c], [1]).strip()))
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print(fmt_row(r, widths))


# ---------------------------------------------------------------- 伺服器與片段


class ServerProcess:
    """以 `python -m export.serving.server` 子行程啟動伺服器（隨機埠），讀出 `listening on`。

    `model_dir`、`voila_dir` 給定時以設定指定模型；`launch_args` 為其他命令列參數（例如
    `--demo-assets DIR --demo-head cosyvoice2`）。
    """

    def __init__(
        self,
        model_dir: Path | None,
        voila_dir: Path | None,
        overrides: list[str],
        launch_args: list[str] | None = None,
        root: Path = ROOT,
    ) -> None:
        cmd = [sys.executable, "-m", "export.serving.server", "--config", "serving"]
        if model_dir is not None:
            cmd += [f"--config.model_dir={model_dir}"]
        if voila_dir is not None:
            cmd += [f"--config.voila_dir={voila_dir}"]
        cmd += [*(launch_args or []), "--config.port=0", "--config.max_sessions=64", *overrides]
        env = dict(os.environ, PYTHONPATH=str(root))
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
        line = ""
        deadline = time.time() + 180
        while "listening on" not in line:
            line = self.proc.stdout.readline()
            if (not line and self.proc.poll() is not None) or time.time() > deadline:
                raise RuntimeError(f"伺服器沒有啟動（結束碼 {self.proc.poll()}）")
        self.target = line.split("listening on")[1].strip()

    def stop(self) -> dict[str, Any]:
        """SIGTERM 結束；回傳伺服器關機時印出的 tick 統計（`tick stats: {...}`，沒有則空）。"""
        out = ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out = self.proc.communicate(timeout=60)[0] or ""
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        for line in out.splitlines():
            if line.startswith("tick stats: "):
                return json.loads(line.removeprefix("tick stats: "))
        return {}


def trim_leading_silence(x: np.ndarray) -> np.ndarray:
    """去掉開頭的非語音（webrtcvad 30 ms 一格），讓插入點就是語音起點。"""
    flags = frame_flags(x, SR)
    idx = np.flatnonzero(flags)
    return x[int(idx[0]) * 480 :] if idx.size else x


def build_clip(target: str, barge_offset: int, tail_frames: int) -> tuple[np.ndarray, int, int]:
    """回傳（片段, 助理第一次開口的幀, 使用者插話的語音起點幀）。

    先以盡快送出的方式跑一次「一句話 + 靜音」得到助理開口的幀（vad 策略與模型都是決定性的，
    同一前綴下助理在同一幀開口），再在開口後第 `barge_offset` 幀插入 1 秒使用者語音。
    """
    speech = synth(SENTENCE, "cmn")
    base = np.concatenate([speech[: int(1.2 * SR)], np.zeros(4 * SR, np.float32)])
    res = stream_audio(target, base, fast=True)
    speaking = res.events(pb.Event.SPEAKING)
    if res.status.name != "OK" or not speaking:
        raise RuntimeError(f"基準串流沒有得到助理開口：{res.status.name} {res.detail}")
    start = int(speaking[0].frame)
    onset = start + barge_offset
    piece = trim_leading_silence(speech[SR:])[:SR]
    end = onset + int(np.ceil(len(piece) / FRAME_SAMPLES)) + tail_frames
    wave = np.zeros(end * FRAME_SAMPLES, np.float32)
    wave[: len(base)] = base[: len(wave)]
    wave[onset * FRAME_SAMPLES : onset * FRAME_SAMPLES + len(piece)] = piece
    return wave, start, onset


# ---------------------------------------------------------------- 量測


def barge_in_stop(res: StreamResult, onset: int) -> tuple[float, float] | None:
    """（音訊時間軸毫秒, 牆鐘毫秒）：使用者語音起點 → 被打斷那一輪最後收到的助理音訊樣本。

    音訊時間軸：最後一個音訊片段的結尾（(seq+1) × 40 ms）減去起點；牆鐘：收到該片段的時間減去
    送出起點那一幀的時間。沒有 `YIELDED` 時回傳 None；起點後沒有助理音訊時兩者為 0。
    """
    idx = next(
        (
            i
            for i, m in enumerate(res.messages)
            if m.WhichOneof("payload") == "event" and m.event.kind == pb.Event.YIELDED
        ),
        None,
    )
    if idx is None:
        return None
    last = None
    for m, t in zip(res.messages[:idx], res.recv_times[:idx], strict=True):
        if m.WhichOneof("payload") == "audio":
            last = (int(m.audio.seq), t)
    sent = res.send_times.get(onset)
    if last is None or sent is None or last[0] < onset:
        return 0.0, 0.0
    timeline = (last[0] + 1 - onset) * FRAME_SECONDS * 1000.0
    return timeline, max(0.0, (last[1] - sent) * 1000.0)


def run_level(
    target: str, wave: np.ndarray, onset: int, conc: int, sessions: int, fast: bool
) -> dict[str, Any]:
    """以 `conc` 個同時會話、共 `sessions` 個會話（分輪）串流同一片段，彙整量測。"""
    rounds = max(1, int(np.ceil(sessions / conc)))
    results: list[StreamResult] = []
    walls: list[float] = []
    for _ in range(rounds):
        got: list[StreamResult | None] = [None] * conc

        def one(i: int, got: list[StreamResult | None] = got) -> None:
            got[i] = stream_audio(target, wave, fast=fast, timeout=300.0)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        results += [r for r in got if r is not None]
    ok = [r for r in results if r.status.name == "OK"]
    audio_s = len(wave) / SR
    fpl, srv_fpl, srv_rtf, stream_rtf, stop_tl, stop_wall = [], [], [], [], [], []
    missing = 0
    for r in ok:
        summ = r.summary()
        fpl += summ["first_packet_latency_ms"]
        srv_fpl += [x for x in summ["server_first_packet_latency_ms"] if x >= 0]
        srv_rtf += [x for x in summ["server_rtf"] if x > 0]
        stream_rtf.append(r.wall_seconds / audio_s)
        b = barge_in_stop(r, onset)
        if b is None:
            missing += 1
        else:
            stop_tl.append(b[0])
            stop_wall.append(b[1])
    return {
        "concurrency": conc,
        "sessions": len(results),
        "errors": len(results) - len(ok),
        "no_yield": missing,
        "first_packet_ms": fpl,
        "server_first_packet_ms": srv_fpl,
        "barge_stop_timeline_ms": stop_tl,
        "barge_stop_wall_ms": stop_wall,
        "server_rtf": srv_rtf,
        "stream_rtf": stream_rtf,
        "throughput_x_realtime": len(ok) * audio_s / sum(walls),
    }


def prepare_head_assets(assets_dir: Path, seed: int) -> list[tuple[str, list[str]]]:
    """三種語音頭設定的示範資產；回傳 [(名稱, 伺服器啟動參數)]。

    voila 用 `assets_dir` 本身（與服務量測同一組示範資產），cosyvoice2 放在 `assets_dir/heads/`。
    cosyvoice2 的兩種 token2wav 共用同一個匯出模型（第二份資料夾以符號連結指向它），只差在
    flow 的分塊大小：tiny 的 10 與官方的 25（串流 hop 取分塊大小，首包要湊滿 hop + 3 個預看）。
    """
    voila = Path(assets_dir)
    base = voila / "heads"
    cosy = base / "cosyvoice2"
    cosy25 = base / "cosyvoice2_chunk25"
    build_demo_assets(voila, seed=seed)
    build_demo_assets(cosy, seed=seed, speech_head="cosyvoice2")
    cosy25.mkdir(parents=True, exist_ok=True)
    if not (cosy25 / "model").exists():
        (cosy25 / "model").symlink_to((cosy / "model").resolve(), target_is_directory=True)
    if not (cosy25 / "token2wav" / TOKEN2WAV_CONFIG).exists():
        save_random_token2wav(
            cosy25 / "token2wav", flow={**FLOW_TINY, "static_chunk_size": 25}, seed=seed
        )
    demo = ["--demo-assets"]
    return [
        ("voila", [*demo, str(voila), "--demo-head", "voila"]),
        ("cosyvoice2 (chunk 10)", [*demo, str(cosy), "--demo-head", "cosyvoice2"]),
        ("cosyvoice2 (chunk 25)", [*demo, str(cosy25), "--demo-head", "cosyvoice2"]),
    ]


def heads_first_packet(
    heads: list[tuple[str, list[str]]], sessions: int, overrides: list[str]
) -> list[dict[str, Any]]:
    """每種語音頭：啟動伺服器，即時送出「一句話 1.2 秒 + 靜音 4 秒」`sessions` 次，量首包。"""
    speech = synth(SENTENCE, "cmn")
    wave = np.concatenate([speech[: int(1.2 * SR)], np.zeros(4 * SR, np.float32)])
    out = []
    for name, launch in heads:
        t0 = time.perf_counter()
        server = ServerProcess(None, None, overrides, launch)
        try:
            stream_audio(server.target, wave, fast=True)  # 暖機（第一次前向較慢）
            fpl, srv, rates, lag = [], [], set(), []
            for _ in range(sessions):
                r = stream_audio(server.target, wave, fast=False, timeout=300.0)
                if r.status.name != "OK":
                    raise RuntimeError(f"{name}: 串流失敗 {r.status.name} {r.detail}")
                summ = r.summary()
                fpl += summ["first_packet_latency_ms"]
                srv += [x for x in summ["server_first_packet_latency_ms"] if x >= 0]
                rates |= {int(a.sample_rate) for a in r.of("audio")}
                lag += first_packet_lag_frames(r)
        finally:
            server.stop()
        out.append(
            {
                "head": name,
                "sessions": sessions,
                "output_sample_rate": sorted(rates),
                "first_packet_ms": fpl,
                "server_first_packet_ms": srv,
                "first_packet_lag_frames": lag,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  {name}: {time.perf_counter() - t0:.1f} s")
    return out


def first_packet_lag_frames(res: StreamResult) -> list[int]:
    """每輪第一個音訊片段收到時，客戶端已送出的最後一個輸入幀減去該片段的幀號（幀數）。"""
    sent = sorted(res.send_times.items(), key=lambda kv: kv[1])
    out: list[int] = []
    seen = False
    for m, t in zip(res.messages, res.recv_times, strict=True):
        kind = m.WhichOneof("payload")
        if kind == "event" and m.event.kind == pb.Event.SPEAKING:
            seen = True
        elif kind == "audio" and seen:
            seen = False
            last = max((f for f, ts in sent if ts <= t), default=-1)
            out.append(last - int(m.audio.seq))
    return out


def frame_step_compare(model_dir: Path, steps: int, seed: int, torch_threads: int) -> dict:
    """PyTorch 孿生 `frame_step` 對 JAX `_frame_step`：同一個 tiny 模型、同樣輸入，逐幀計時。"""
    # 延後匯入：只有這個比較用到 JAX，且要在 main 呼叫 configure_cpu_simulation() 之後
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from export.torch_model import load_exported
    from speakllm_jax.config import load_config
    from speakllm_jax.models.streaming import _frame_step
    from speakllm_jax.training.tasks import get_task

    torch.set_num_threads(torch_threads)
    tm = load_exported(model_dir, attn_implementation="sdpa", dtype=torch.float32, device="cpu")
    task = get_task(load_config("phase2", []))
    jm = task.build_model(nnx.Rngs(seed))  # 與 build_demo_assets 同一個種子 → 同樣的權重
    d = int(jm.cfg.qwen.hidden_size)
    k, q = int(jm.cfg.max_chars_per_token), int(jm.cfg.speech.num_codebooks)
    pad = int(tm.cfg.pad_id)
    warm = 5
    n = steps + warm
    user = np.random.default_rng(seed).normal(size=(n, 1, 1, d)).astype(np.float32)

    # PyTorch（eager、DynamicCache）。
    cache = tm.new_cache()
    prev = {
        "text": torch.full((1, 1), pad, dtype=torch.long),
        "tones": torch.zeros((1, 1, k), dtype=torch.long),
        "codes": torch.zeros((1, 1, q), dtype=torch.long),
        "codes_valid": torch.zeros((1, 1), dtype=torch.bool),
    }
    t_torch, torch_first = [], None
    for f in range(n):
        t0 = time.perf_counter()
        cache, out = tm.frame_step(cache, f, torch.from_numpy(user[f]), prev)
        dt = time.perf_counter() - t0
        if f == 0:
            torch_first = out["text"][0, 0].numpy().copy()
        if f >= warm:
            t_torch.append(dt)
        tok = torch.argmax(out["text"][:, 0], dim=-1)
        prev = {
            "text": tok[:, None],
            "tones": prev["tones"],
            "codes": out["code_ids"].to(torch.long),
            "codes_valid": torch.ones((1, 1), dtype=torch.bool),
        }

    # JAX（jit，固定長度 KV 快取）。
    graphdef, state = nnx.split(jm)
    jcache = jm.llm.init_cache(1, n)
    jprev = {
        "text": jnp.full((1, 1), pad, jnp.int32),
        "tones": jnp.zeros((1, 1, k), jnp.int32),
        "codes": jnp.zeros((1, 1, q), jnp.int32),
        "codes_valid": jnp.zeros((1, 1), bool),
    }
    target = jnp.zeros((1, 1, q), jnp.int32)
    cond = jnp.zeros((1,), jnp.int32)
    t_jax, jax_first = [], None
    t_compile = 0.0
    for f in range(n):
        t0 = time.perf_counter()
        jcache, out = _frame_step(
            graphdef, state, jcache, jnp.asarray(user[f]), jprev, target, cond, False, False
        )
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if f == 0:
            t_compile = dt
            jax_first = np.asarray(out["text"][0, 0])
        if f >= warm:
            t_jax.append(dt)
        tok = jnp.argmax(out["text"][:, 0], axis=-1).astype(jnp.int32)
        jprev = {
            "text": tok[:, None],
            "tones": jprev["tones"],
            "codes": out["code_ids"].astype(jnp.int32),
            "codes_valid": jnp.ones((1, 1), bool),
        }
    return {
        "steps": steps,
        "torch_threads": torch_threads,
        "torch_ms": [x * 1000 for x in t_torch],
        "jax_ms": [x * 1000 for x in t_jax],
        "jax_first_call_ms": t_compile * 1000,
        "first_step_text_logits_max_abs_diff": float(np.abs(torch_first - jax_first).max()),
    }


# ---------------------------------------------------------------- 全雙工手感：舊版對新版


def old_tree(commit: str) -> Path:
    """把 `commit` 的程式解到暫存資料夾（`git archive`，不是 worktree），回傳其根目錄。"""
    sha = subprocess.run(
        ["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    out = Path(f"/tmp/speakllm_bench_old_{sha[:10]}")
    if not (out / "export" / "serving" / "server.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def feel_session(res: StreamResult, user_end: int, onset: int) -> dict[str, Any]:
    """一個會話的手感量測：說完 → 首包（ms）、打斷起點後送到的音訊幀數、串流即時率。"""
    first = None
    turns = 0
    leaked = 0
    for m, t in zip(res.messages, res.recv_times, strict=True):
        kind = m.WhichOneof("payload")
        if kind == "event" and m.event.kind == pb.Event.SPEAKING:
            turns += 1
        elif kind == "audio" and turns == 1:
            if first is None:
                first = t
            if m.audio.seq > onset:
                leaked += 1
    sent = res.send_times.get(user_end)
    return {
        "first_after_end_ms": (first - sent) * 1000.0 if first and sent else None,
        "leaked_frames": leaked,
        "stream_rtf": res.wall_seconds / (res.frames_sent * FRAME_SECONDS),
        "ok": res.status.name == "OK",
    }


def feel_level(
    target: str, wave: np.ndarray, user_end: int, onset: int, realtime: int, fast: int = 0
) -> list[dict[str, Any]]:
    """`realtime` 個即時會話與 `fast` 個盡快送出的會話同時跑；回傳即時會話的量測。"""
    got: list[StreamResult | None] = [None] * (realtime + fast)

    def one(i: int) -> None:
        got[i] = stream_audio(target, wave, fast=i >= realtime, timeout=600.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(realtime + fast)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [feel_session(r, user_end, onset) for r in got[:realtime] if r is not None]


def feel_compare(
    model_dir: Path, voila_dir: Path, levels: list[int], old_commit: str, overrides: list[str]
) -> list[dict[str, Any]]:
    speech = synth(SENTENCE, "cmn")
    rows = []
    for name, root in (("old", old_tree(old_commit)), ("new", ROOT)):
        server = ServerProcess(model_dir, voila_dir, overrides, root=root)
        try:
            wave, start, onset = build_clip(server.target, 10, 20)
            user_end = int(1.2 * SR) // FRAME_SAMPLES - 1
            assert np.abs(speech[: int(1.2 * SR)]).max() > 0
            cases = [(c, 0) for c in levels] + [(1, 2)]
            for conc, fast in cases:
                t0 = time.perf_counter()
                ss = feel_level(server.target, wave, user_end, onset, conc, fast)
                row = {
                    "server": name,
                    "realtime_sessions": conc,
                    "fast_sessions": fast,
                    "errors": sum(not x["ok"] for x in ss) + conc - len(ss),
                    "first_after_end_ms": [
                        x["first_after_end_ms"] for x in ss if x["first_after_end_ms"] is not None
                    ],
                    "leaked_frames": [x["leaked_frames"] for x in ss],
                    "stream_rtf": [x["stream_rtf"] for x in ss],
                }
                rows.append(row)
                print(f"  {name} {conc} rt + {fast} fast: {time.perf_counter() - t0:.1f} s")
        finally:
            server.stop()
    return rows


# ---------------------------------------------------------------- 排程：單一會話路徑對批次排程


def sched_compare(
    model_dir: Path,
    voila_dir: Path,
    levels: list[int],
    old_levels: list[int],
    overrides: list[str],
    fast_senders: int,
    decode_modes: tuple[str, ...] = ("stream",),
) -> list[dict[str, Any]]:
    """每個（排程, Voila 解碼方式, 同時會話數）一個新的伺服器子行程，所有會話同時即時送出同一段片段。

    量客戶端的：使用者最後一個語音幀送出 → 第一個助理音訊（ms）、打斷起點之後送到的助理音訊
    幀數、串流牆鐘 ÷ 音訊長度、錯誤數；伺服器關機時印出的 tick 計算時間。另在每個排程跑
    「1 個即時會話 + `fast_senders` 個盡快送出的會話」（`fast_senders` > 0 時）。某個排程的同時數
    清單是空的就略過那個排程；`decode_modes` 為 `decode_mode` 的 "stream"／"window"。
    """
    rows: list[dict[str, Any]] = []
    clip: tuple[np.ndarray, int, int] | None = None
    user_end = int(1.2 * SR) // FRAME_SAMPLES - 1
    combos = [(s, m) for s in ("per_session", "batched") for m in decode_modes]
    for sched, mode in combos:
        todo = [(c, 0) for c in (old_levels if sched == "per_session" else levels)]
        if not todo:
            continue
        if fast_senders > 0:
            todo.append((1, fast_senders))
        for conc, fast in todo:
            server = ServerProcess(
                model_dir,
                voila_dir,
                [*overrides, f"--config.scheduler={sched}", f"--config.decode_mode={mode}"],
            )
            try:
                if clip is None:
                    clip = build_clip(server.target, 10, 20)
                wave, _, onset = clip
                t0 = time.perf_counter()
                ss = feel_level(server.target, wave, user_end, onset, conc, fast)
                wall = time.perf_counter() - t0
            finally:
                ticks = server.stop()
            first = [x["first_after_end_ms"] for x in ss if x["first_after_end_ms"] is not None]
            row = {
                "scheduler": sched,
                "decode_mode": mode,
                "realtime_sessions": conc,
                "fast_sessions": fast,
                "errors": sum(not x["ok"] for x in ss) + conc - len(ss),
                "first_after_end_ms": first,
                "leaked_frames": [x["leaked_frames"] for x in ss],
                "stream_rtf": [x["stream_rtf"] for x in ss],
                "ticks": ticks,
                "load_average": os.getloadavg(),
            }
            rows.append(row)
            print(
                f"  {sched}/{mode} {conc} rt + {fast} fast: {wall:.1f} s, first p90 "
                f"{pct(first)[1]:.0f} ms, load {row['load_average'][0]:.1f}",
                flush=True,
            )
    return rows


def print_sched(rows: list[dict[str, Any]]) -> None:
    """排程比較表：各列對同排程 1 個會話的首包 p90 比值，批次對單一會話路徑的比值。"""

    def label(r: dict[str, Any]) -> str:
        return f"{r['scheduler']}/{r.get('decode_mode', 'window')}"

    ref = {
        label(r): pct(r["first_after_end_ms"])[1]
        for r in rows
        if r["realtime_sessions"] == 1 and r["fast_sessions"] == 0
    }
    old = {
        (r.get("decode_mode"), r["realtime_sessions"]): pct(r["first_after_end_ms"])[1]
        for r in rows
        if r["scheduler"] == "per_session" and r["fast_sessions"] == 0
    }
    table = []
    for r in rows:
        p50, p90, p99 = pct(r["first_after_end_ms"])
        t = r["ticks"]
        key = (r.get("decode_mode"), r["realtime_sessions"])
        vs_old = (
            p90 / old[key]
            if r["scheduler"] == "batched" and r["fast_sessions"] == 0 and key in old
            else float("nan")
        )
        table.append(
            [
                label(r),
                r["realtime_sessions"],
                r["fast_sessions"],
                r["errors"],
                p50,
                p90,
                p99,
                p90 / ref.get(label(r), float("nan")),
                vs_old,
                max(r["leaked_frames"], default=-1),
                t.get("p50_ms", float("nan")),
                t.get("p90_ms", float("nan")),
                t.get("frame_ms", float("nan")),
                t.get("batch_fallbacks", float("nan")),
                pct(r["stream_rtf"])[1],
                r["load_average"][0],
            ]
        )
    print_table(
        "Scheduler (tiny demo model, CPU, real time; client-side first audio after user end ms; "
        "x1 = p90 / same scheduler+decode's 1 session; vs old = batched p90 / per_session p90; "
        "leak = assistant audio frames after barge-in onset; tick = server compute per tick; "
        "fallback = batched steps that fell back to per-session, should be 0)",
        [
            "scheduler",
            "rt",
            "fast",
            "err",
            "p50",
            "p90",
            "p99",
            "x1",
            "vs old",
            "leak",
            "tick p50",
            "tick p90",
            "ms/frame",
            "fallback",
            "RTF p90",
            "load",
        ],
        table,
    )


# ---------------------------------------------------------------- 主程式


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,4,8", help="同時會話數（逗號分隔）")
    p.add_argument("--sessions", type=int, default=8, help="每個同時數的即時會話總數（分輪）")
    p.add_argument("--no-fast", action="store_true", help="不跑盡快送出的處理即時率")
    p.add_argument("--barge-offset", type=int, default=10, help="助理開口後第幾幀插話")
    p.add_argument("--tail-frames", type=int, default=20, help="插話結束後的靜音幀數")
    p.add_argument("--frame-steps", type=int, default=100, help="每幀計算比較的步數（0 跳過）")
    p.add_argument("--torch-threads", type=int, default=1, help="與伺服器預設相同")
    p.add_argument("--no-serving", action="store_true", help="跳過服務端到端量測")
    p.add_argument("--no-heads", action="store_true", help="跳過兩種語音頭的首包比較")
    p.add_argument("--head-sessions", type=int, default=3, help="每種語音頭的即時會話數")
    p.add_argument("--assets-dir", default="/tmp/speakllm_bench_serving_assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], help="伺服器設定覆寫，可重複")
    p.add_argument("--json", default="", help="另把所有量測寫成 JSON")
    p.add_argument("--feel", action="store_true", help="跑全雙工手感的舊版對新版比較")
    p.add_argument("--feel-levels", default="1,4,8", help="手感比較的同時會話數（逗號分隔）")
    p.add_argument("--old-commit", default="main", help="舊版伺服器的 commit（git archive）")
    p.add_argument("--sched", action="store_true", help="比較單一會話路徑與批次排程")
    p.add_argument("--sched-levels", default="1,4,8,16,32,64", help="批次排程的同時會話數")
    p.add_argument(
        "--old-levels", default="1,4,8,16", help="單一會話路徑的同時會話數（2 核上更多太慢）"
    )
    p.add_argument(
        "--fast-senders", type=int, default=2, help="即時會話旁盡快送出的會話數（0 不跑）"
    )
    p.add_argument(
        "--decode-modes",
        default="stream",
        help="排程比較的 Voila 解碼方式（逗號分隔：stream、window）",
    )
    p.add_argument(
        "--no-estimate", action="store_true", help="不印 H100 紙上估算（需要 JAX 建抽象模型）"
    )
    args = p.parse_args(argv)
    configure_cpu_simulation()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    report: dict[str, Any] = {"cpu_count": os.cpu_count()}
    t_all = time.perf_counter()
    print(f"bench_serving: {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPU cores")
    model_dir, voila_dir = build_demo_assets(args.assets_dir, seed=args.seed)
    heads = json.loads((model_dir / "heads_config.json").read_text(encoding="utf-8"))
    if "encoder_left_chunks" not in heads:
        # 沿用的舊資產沒有串流編碼欄位：伺服器會退回切窗編碼，量到的不是現在的伺服器。
        print(
            f"錯誤：{model_dir}/heads_config.json 是舊版示範資產（沒有 encoder_left_chunks），"
            "刪掉該資料夾或換 --assets-dir",
            file=sys.stderr,
        )
        return 2
    print(f"demo assets: {model_dir.parent} ({time.perf_counter() - t_all:.1f} s)")

    scfg = get_config()
    for ov in args.server_arg:
        key, _, val = ov.removeprefix("--config.").partition("=")
        if key in scfg:
            scfg[key] = type(scfg[key])(val)

    if not args.no_serving:
        server = ServerProcess(model_dir, voila_dir, args.server_arg)
        try:
            wave, start, onset = build_clip(server.target, args.barge_offset, args.tail_frames)
            print(
                f"clip: {len(wave) / SR:.2f} s; assistant starts at frame {start}, "
                f"user barges in at frame {onset} ({onset * 40} ms); server {server.target}, "
                f"compute_workers={scfg.compute_workers}, torch_threads={scfg.torch_threads}, "
                f"chunk_frames={scfg.chunk_frames}"
            )
            levels_out = []
            for c in levels:
                t0 = time.perf_counter()
                rt = run_level(server.target, wave, onset, c, max(args.sessions, c), fast=False)
                fast = None
                if not args.no_fast:
                    fast = run_level(server.target, wave, onset, c, c, fast=True)
                levels_out.append({"realtime": rt, "fast": fast})
                print(f"  concurrency {c}: {time.perf_counter() - t0:.1f} s")
            report["serving"] = {"clip_seconds": len(wave) / SR, "levels": levels_out}
        finally:
            server.stop()
        rows = []
        for lv in levels_out:
            rt, fast = lv["realtime"], lv["fast"]
            c = rt["concurrency"]
            for name, key, src in [
                ("first packet ms (client)", "first_packet_ms", rt),
                ("server trigger->first packet ms", "server_first_packet_ms", rt),
                ("barge-in stop ms (audio timeline)", "barge_stop_timeline_ms", rt),
                ("barge-in stop ms (wall clock)", "barge_stop_wall_ms", rt),
                ("RTF server compute/audio", "server_rtf", rt),
                ("RTF stream wall/audio (real time)", "stream_rtf", rt),
                ("RTF processing wall/audio (--fast)", "stream_rtf", fast),
            ]:
                if src is None:
                    continue
                xs = src[key]
                rows.append([c, name, len(xs), *pct(xs)])
        print_table(
            "Serving (tiny demo model, CPU; client-side; p50/p90/p99)",
            ["conc", "metric", "n", "p50", "p90", "p99"],
            rows,
        )
        print_table(
            "Sessions",
            ["conc", "sessions", "errors", "no_yield", "x realtime (rt)", "x realtime (fast)"],
            [
                [
                    lv["realtime"]["concurrency"],
                    lv["realtime"]["sessions"],
                    lv["realtime"]["errors"],
                    lv["realtime"]["no_yield"],
                    lv["realtime"]["throughput_x_realtime"],
                    lv["fast"]["throughput_x_realtime"] if lv["fast"] else float("nan"),
                ]
                for lv in levels_out
            ],
        )

    if args.feel:
        fl = [int(x) for x in args.feel_levels.split(",") if x.strip()]
        print(f"\nduplex feel, old ({args.old_commit}) vs new, real-time sessions:")
        feel = feel_compare(model_dir, voila_dir, fl, args.old_commit, args.server_arg)
        report["feel"] = feel
        print_table(
            "Duplex feel (client-side; first audio after user end p50/p90 ms; barge-in audio "
            "frames after onset; stream wall/audio)",
            ["server", "rt", "fast", "err", "first p50", "first p90", "leak max", "RTF p50"],
            [
                [
                    r["server"],
                    r["realtime_sessions"],
                    r["fast_sessions"],
                    r["errors"],
                    pct(r["first_after_end_ms"])[0],
                    pct(r["first_after_end_ms"])[1],
                    max(r["leaked_frames"], default=-1),
                    pct(r["stream_rtf"])[0],
                ]
                for r in feel
            ],
        )
        print(f"  load average: {os.getloadavg()}")

    if args.sched:
        sl = [int(x) for x in args.sched_levels.split(",") if x.strip()]
        ol = [int(x) for x in args.old_levels.split(",") if x.strip()]
        print(f"\nscheduler: per_session {ol} vs batched {sl}, load {os.getloadavg()}")
        modes = tuple(x.strip() for x in args.decode_modes.split(",") if x.strip())
        report["scheduler"] = sched_compare(
            model_dir, voila_dir, sl, ol, args.server_arg, args.fast_senders, modes
        )
        print_sched(report["scheduler"])
        print(f"  load average: {os.getloadavg()}")

    if not args.no_heads:
        heads = prepare_head_assets(Path(args.assets_dir), args.seed)
        print(f"\nspeech heads ({args.head_sessions} real-time sessions each, concurrency 1):")
        hres = heads_first_packet(heads, args.head_sessions, args.server_arg)
        report["speech_heads"] = hres
        ref = pct(hres[0]["first_packet_ms"])[0]
        print_table(
            "First packet per speech head (tiny demo model, CPU, real time; client-side ms)",
            ["head", "rate Hz", "n", "p50", "p90", "server p50", "lag frames", "ratio p50/voila"],
            [
                [
                    h["head"],
                    ",".join(str(x) for x in h["output_sample_rate"]),
                    len(h["first_packet_ms"]),
                    pct(h["first_packet_ms"])[0],
                    pct(h["first_packet_ms"])[1],
                    pct(h["server_first_packet_ms"])[0],
                    float(np.median(h["first_packet_lag_frames"]))
                    if h["first_packet_lag_frames"]
                    else float("nan"),
                    pct(h["first_packet_ms"])[0] / ref,
                ]
                for h in hres
            ],
        )

    if args.frame_steps > 0:
        fs = frame_step_compare(model_dir, args.frame_steps, args.seed, args.torch_threads)
        report["frame_step"] = fs
        pt, jx = pct(fs["torch_ms"]), pct(fs["jax_ms"])
        print_table(
            f"Per-frame step (tiny model, CPU, {fs['steps']} free-running steps; "
            f"torch threads={fs['torch_threads']}; first-step text logits max|diff|="
            f"{fs['first_step_text_logits_max_abs_diff']:.2e}; JAX first call "
            f"{fs['jax_first_call_ms']:.0f} ms)",
            ["impl", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
            [
                ["torch frame_step", *pt, float(np.mean(fs["torch_ms"]))],
                ["jax _frame_step", *jx, float(np.mean(fs["jax_ms"]))],
                [
                    "ratio torch/jax",
                    *(a / b for a, b in zip(pt, jx, strict=True)),
                    float(np.mean(fs["torch_ms"]) / np.mean(fs["jax_ms"])),
                ],
            ],
        )

    if not args.no_estimate:
        # H100 紙上估算（full 預設，批次 1／8／32／64）：見 benchmarks/paper_estimate.py。
        import paper_estimate

        print()
        dims = paper_estimate.model_dims("full")
        report["h100_estimate"] = [
            paper_estimate.step_cost(dims, b, 750) for b in paper_estimate.DEFAULT_BATCHES
        ]
        paper_estimate.main([])

    print(f"\ntotal {time.perf_counter() - t_all:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
