"""Full-Duplex-Bench v1 的輪替指標，改用本專案的標註，從客戶端收到的助理音訊幀計算。

輸入：每段對話的標註（`TurnTakingAnnotation.from_row`：使用者發言段、句中停頓 `pauses`、
附和、搶話；秒）、對話語言（清單的 `language`），以及客戶端收到的助理音訊幀號（伺服器音訊封包的
`seq`，即使用者時間軸上的 40 ms 幀；幀 f 涵蓋 [f·40, (f+1)·40) ms）。

名詞（參數見 `BenchConfig`）：
- 助理音訊段：收到的幀連成的區段，中間缺不超過 `max_gap_frames` 幀視為同一段；段為 [起, 迄) 幀。
- 接話（takeover）：長度 ≥ `takeover_s`（FDB 的規則：1 秒）的音訊段，以其起點幀計。
- 「t 時助理在說」：有音訊段涵蓋幀 floor(t / 0.04)。

指標（事件合併後計算；沒有事件時為 None）：
- `pause_takeover_rate`（越低越好）：起點落在停頓 [floor(s/0.04), ceil(e/0.04)) 內的接話，
  占停頓數的比例。
- `backchannel_takeover_rate`（越低越好）：附和 [s, e) 中「助理讓出或接話」的比例。讓出 = 附和起點時
  助理在說，而該音訊段在 ceil(e/0.04) + `backchannel_window_s` 之前結束；接話 = 有接話的起點落在
  [floor(s/0.04), ceil(e/0.04) + `backchannel_response_s`)。
- `smooth_takeover_rate`（越高越好）：使用者發言段（真正的輪次結束，不含附和）結束 e 之後，
  在 [floor(e/0.04), 下一段使用者發言起點與 e + `response_window_s` 取早者) 內有接話的比例；
  `smooth_latency_ms_p50／p90`：接話起點 − e（毫秒，不小於 0）。
- `interruption_yield_rate`（越高越好）：搶話起點 o 時助理在說（適用事件），其音訊段在
  o + `yield_window_s` 以內結束的比例；`interruption_stop_ms_p50`：音訊段結束（最後一個音訊幀的
  終點）− o，毫秒，取所有適用事件的中位數。

每個數字另依語言（`LANGUAGE_GROUPS`：zh、en、cs）分組。`plot_duplex_timeline` 畫時間軸（附圖例），
`markdown_table` 把各策略並列成表格。
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.data.interleave import FRAME_SECONDS, seconds_to_end_frame, seconds_to_frame
from speakllm_jax.eval.turn_taking import TurnTakingAnnotation

# 清單的 language 值 → 報表的語言組（語碼轉換在清單裡是 "mixed"）。
LANGUAGE_GROUPS = {"zh": "zh", "en": "en", "mixed": "cs"}
METRIC_KEYS = (
    "pause_takeover_rate",
    "backchannel_takeover_rate",
    "smooth_takeover_rate",
    "smooth_latency_ms_p50",
    "smooth_latency_ms_p90",
    "interruption_yield_rate",
    "interruption_stop_ms_p50",
)
RATE_KEYS = tuple(k for k in METRIC_KEYS if k.endswith("_rate"))
FRAME_MS = FRAME_SECONDS * 1000.0


@dataclass(frozen=True)
class BenchConfig:
    """指標參數（秒；幀為 40 ms）。"""

    takeover_s: float = 1.0
    max_gap_frames: int = 1
    response_window_s: float = 3.0
    backchannel_window_s: float = 0.2
    backchannel_response_s: float = 1.0
    yield_window_s: float = 1.0

    @property
    def takeover_frames(self) -> int:
        return max(1, round(self.takeover_s / FRAME_SECONDS))


def _frames(seconds: float) -> int:
    return int(round(seconds / FRAME_SECONDS))


def activity_from_frames(frames: Iterable[int], num_frames: int = 0) -> np.ndarray:
    """收到的助理音訊幀號 → 逐幀 bool [N]（N 取 `num_frames` 與最大幀號 + 1 的較大者）。"""
    idx = np.asarray(sorted({int(f) for f in frames if int(f) >= 0}), dtype=np.int64)
    n = max(int(num_frames), int(idx[-1]) + 1 if len(idx) else 0)
    act = np.zeros(n, dtype=bool)
    act[idx] = True
    return act


def audio_segments(activity: Any, max_gap_frames: int = 1) -> list[tuple[int, int]]:
    """助理音訊段 [起, 迄)：連續的有聲幀，中間缺不超過 `max_gap_frames` 幀的併成一段。"""
    idx = np.flatnonzero(np.asarray(activity, dtype=bool).reshape(-1))
    out: list[tuple[int, int]] = []
    for f in idx.tolist():
        if out and f - out[-1][1] <= max_gap_frames:
            out[-1] = (out[-1][0], f + 1)
        else:
            out.append((f, f + 1))
    return out


def _covering(segs: list[tuple[int, int]], frame: int) -> tuple[int, int] | None:
    for a, b in segs:
        if a <= frame < b:
            return a, b
    return None


def dialogue_events(
    ann: TurnTakingAnnotation, activity: Any, config: BenchConfig | None = None
) -> dict[str, Any]:
    """一段對話的逐事件結果（JSON 可序列化；時間為秒或毫秒）。"""
    cfg = config or BenchConfig()
    segs = audio_segments(activity, cfg.max_gap_frames)
    takeovers = [a for a, b in segs if b - a >= cfg.takeover_frames]

    def takeover_in(lo: int, hi: int) -> int | None:
        hit = [a for a in takeovers if lo <= a < hi]
        return hit[0] if hit else None

    pauses = []
    for s, e in ann.pauses:
        t = takeover_in(seconds_to_frame(s), seconds_to_end_frame(e))
        pauses.append({"start": s, "end": e, "takeover": t is not None, "onset_frame": t})
    bcs = []
    for s, e in ann.backchannels:
        seg = _covering(segs, seconds_to_frame(s))
        end_f = seconds_to_end_frame(e)
        yielded = seg is not None and seg[1] < end_f + _frames(cfg.backchannel_window_s)
        t = takeover_in(seconds_to_frame(s), end_f + _frames(cfg.backchannel_response_s))
        bcs.append(
            {
                "start": s,
                "end": e,
                "speaking": seg is not None,
                "yielded": bool(yielded),
                "takeover": t is not None,
                "bad": bool(yielded or t is not None),
            }
        )
    starts = sorted(a for a, _ in ann.user_turns)
    smooth = []
    for s, e in ann.user_turns:
        lo = seconds_to_frame(e)
        later = [seconds_to_frame(x) for x in starts if x > s + 1e-9 and x >= e - 1e-9]
        hi = min([lo + _frames(cfg.response_window_s)] + later)
        t = takeover_in(lo, hi)
        lat = None if t is None else round(max(0.0, t * FRAME_MS - e * 1000.0), 3)
        smooth.append({"start": s, "end": e, "takeover": t is not None, "latency_ms": lat})
    barges = []
    for o, e in ann.barge_ins:
        seg = _covering(segs, seconds_to_frame(o))
        ev: dict[str, Any] = {"onset": o, "end": e, "applicable": seg is not None}
        if seg is not None:
            stop_ms = round(seg[1] * FRAME_MS - o * 1000.0, 3)
            ev["stop_ms"] = stop_ms
            ev["yielded"] = bool(stop_ms <= cfg.yield_window_s * 1000.0 + 1e-6)
        barges.append(ev)
    return {
        "id": ann.id,
        "segments": segs,
        "pauses": pauses,
        "backchannels": bcs,
        "smooth": smooth,
        "interruptions": barges,
    }


def _rate(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _summarize(per: Sequence[dict[str, Any]]) -> dict[str, Any]:
    pauses = [p for d in per for p in d["pauses"]]
    bcs = [b for d in per for b in d["backchannels"]]
    smooth = [s for d in per for s in d["smooth"]]
    inter = [b for d in per for b in d["interruptions"]]
    app = [b for b in inter if b["applicable"]]
    lat = [s["latency_ms"] for s in smooth if s["takeover"]]
    stop = [b["stop_ms"] for b in app]
    return {
        "pause_takeover_rate": _rate(sum(p["takeover"] for p in pauses), len(pauses)),
        "backchannel_takeover_rate": _rate(sum(b["bad"] for b in bcs), len(bcs)),
        "smooth_takeover_rate": _rate(len(lat), len(smooth)),
        "smooth_latency_ms_p50": _pct(lat, 50),
        "smooth_latency_ms_p90": _pct(lat, 90),
        "interruption_yield_rate": _rate(sum(b["yielded"] for b in app), len(app)),
        "interruption_stop_ms_p50": _pct(stop, 50),
        "events": {
            "pauses": len(pauses),
            "backchannels": len(bcs),
            "backchannels_while_speaking": sum(b["speaking"] for b in bcs),
            "turn_ends": len(smooth),
            "interruptions": len(inter),
            "interruptions_applicable": len(app),
        },
    }


def bench_metrics(
    annotations: Sequence[TurnTakingAnnotation],
    activities: Sequence[Any],
    languages: Sequence[str],
    config: BenchConfig | None = None,
) -> dict[str, Any]:
    """一個策略在多段對話上的指標（`METRIC_KEYS`、`events`、`by_language`、逐段的 `dialogues`）。"""
    if not len(annotations) == len(activities) == len(languages):
        raise ValueError(
            f"標註 {len(annotations)} 段、助理音訊 {len(activities)} 段、語言 {len(languages)} 個，"
            "數量不同"
        )
    per = [dialogue_events(a, s, config) for a, s in zip(annotations, activities)]
    out = _summarize(per)
    groups: dict[str, list[dict[str, Any]]] = {}
    for d, lang in zip(per, languages):
        groups.setdefault(LANGUAGE_GROUPS.get(lang, lang), []).append(d)
    out["by_language"] = {g: _summarize(ds) for g, ds in sorted(groups.items())}
    out["dialogues"] = per
    return out


def check_report(report: dict[str, Any]) -> list[str]:
    """檢查 `turn_taking.json` 的結構與數值範圍；回傳問題清單（空清單表示合格）。"""
    probs: list[str] = []
    pols = report.get("policies")
    if not isinstance(pols, dict) or not pols:
        return ["policies: 缺少或是空的"]
    if not isinstance(report.get("n_dialogues"), int) or report["n_dialogues"] < 1:
        probs.append("n_dialogues: 必須是正整數")
    for name, m in pols.items():
        blocks = [(name, m)] + [(f"{name}.{g}", v) for g, v in m.get("by_language", {}).items()]
        if "by_language" not in m:
            probs.append(f"{name}.by_language: 缺少")
        for where, block in blocks:
            for k in METRIC_KEYS:
                if k not in block:
                    probs.append(f"{where}.{k}: 缺少")
                    continue
                v = block[k]
                if v is None:
                    continue
                if not isinstance(v, int | float) or not math.isfinite(v):
                    probs.append(f"{where}.{k}: 不是數字（{v!r}）")
                elif k in RATE_KEYS and not 0.0 <= v <= 1.0:
                    probs.append(f"{where}.{k}: 比率 {v} 不在 [0, 1]")
                elif k not in RATE_KEYS and v < 0:
                    probs.append(f"{where}.{k}: 毫秒 {v} 小於 0")
    return probs


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if key in RATE_KEYS else f"{v:.0f}"


def markdown_table(report: dict[str, Any]) -> str:
    """把各策略的指標並列成 Markdown 表格（總表與依語言的表）。"""
    pols = report["policies"]
    names = list(pols)
    lines = [
        f"對話數：{report['n_dialogues']}",
        "",
        "| metric | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for k in METRIC_KEYS:
        lines.append(f"| {k} | " + " | ".join(_fmt(pols[p].get(k), k) for p in names) + " |")
    langs = sorted({g for p in names for g in pols[p].get("by_language", {})})
    if langs:
        cols = [f"{p} {g}" for g in langs for p in names]
        lines += ["", "| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        for k in METRIC_KEYS:
            vals = [
                _fmt(pols[p].get("by_language", {}).get(g, {}).get(k), k)
                for g in langs
                for p in names
            ]
            lines.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_duplex_timeline(
    ann: TurnTakingAnnotation,
    activities: dict[str, Any],
    path: str | os.PathLike,
    events: dict[str, Sequence[tuple[int, str]]] | None = None,
    title: str | None = None,
) -> Path:
    """一段對話的時間軸 PNG：使用者發言（藍）、附和（綠）、停頓（灰底）、搶話起點（紅線），
    每個策略一列收到的助理音訊（橘）與伺服器事件（符號），附圖例。"""
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib

    matplotlib.use("Agg", force=False)
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fs = FRAME_SECONDS
    names = list(activities)
    n = max([len(np.asarray(a).reshape(-1)) for a in activities.values()] + [1])
    end_s = max([n * fs] + [e for _, e in ann.user_turns] + [e for _, e in ann.backchannels])
    rows = len(names) + 1
    fig, ax = plt.subplots(figsize=(max(8.0, end_s / 2.0), 1.0 + 0.7 * rows))
    uy = 10 * len(names)
    ax.broken_barh([(a, b - a) for a, b in ann.user_turns], (uy, 8), facecolors="tab:blue")
    ax.broken_barh([(a, b - a) for a, b in ann.backchannels], (uy, 8), facecolors="tab:green")
    for a, b in ann.pauses:
        ax.axvspan(a, b, color="0.85", zorder=0)
    for a, _ in ann.barge_ins:
        ax.axvline(a, color="tab:red", lw=1.2)
    markers = {"SPEAKING": ("^", "black"), "YIELDED": ("x", "tab:red"), "BACKCHANNEL": ("o", "g")}
    for i, name in enumerate(names):
        y = 10 * (len(names) - 1 - i)
        segs = audio_segments(activities[name], 0)
        ax.broken_barh([(a * fs, (b - a) * fs) for a, b in segs], (y, 8), facecolors="tab:orange")
        for frame, kind in (events or {}).get(name, []):
            if kind in markers:
                m, c = markers[kind]
                ax.plot(frame * fs, y + 4, marker=m, color=c, ms=6, ls="none")
    ax.set_yticks(
        [10 * (len(names) - 1 - i) + 4 for i in range(len(names))] + [uy + 4],
        labels=[f"assistant ({p})" for p in names] + ["user"],
    )
    ax.set_xlim(0, end_s)
    ax.set_xlabel("time (s)")
    legend = [
        Patch(color="tab:blue", label="user speech"),
        Patch(color="tab:green", label="user backchannel"),
        Patch(color="0.85", label="within-turn pause"),
        Line2D([], [], color="tab:red", label="barge-in onset"),
        Patch(color="tab:orange", label="assistant audio (client)"),
    ] + [
        Line2D([], [], marker=m, color=c, ls="none", label=f"event {k}")
        for k, (m, c) in markers.items()
    ]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=7)
    ax.set_title(title or ann.id)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out
