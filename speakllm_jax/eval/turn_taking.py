"""輪替（turn-taking）指標，仿 Full-Duplex-Bench v1／v1.5 的事件定義，在 25 Hz 幀格上計算。

輸入：每段對話的標註（`TurnTakingAnnotation`：使用者發言段、使用者句中停頓、使用者附和、
使用者搶話，皆以秒計）與模型的逐幀助理說話狀態 `speaking: bool [N]`（例如輪替頭的決策，
或對助理輸出音訊做 VAD）。時間轉幀與 `speakllm_jax.data.interleave` 相同：起點 floor(t / 0.04)、
終點 ceil(t / 0.04)。

名詞（參數見 `TurnTakingConfig`）：
- 助理「開口」於幀 t：speaking[t] 為真、t = 0 或 speaking[t - 1] 為假，且從 t 起連續至少
  `min_speech_frames` 幀為真（過短的雜訊不算）。
- 助理「停下」於幀 t：從 t 起連續至少 `min_silence_frames` 幀為假（超出 N 的幀視為無聲）。

指標（事件層級，多段對話時把事件合併後計算）：
- 停頓接話率 pause TOR（越低越好）：停頓 [s, e + grace) 內助理有開口的停頓比例。
- 附和接話率 backchannel TOR（越低越好）：附和起點時助理正在說（適用事件），且在
  [附和起點, 附和終點 + `backchannel_window_s`) 內助理停下的比例。
- 搶話：適用事件為搶話起點 o 時助理正在說。停止延遲 = (第一個 t >= o 且助理在 t 停下) - o，
  以秒計；`stop_rate` = 停止延遲 <= `stop_window_s` 的比例（越高越好）。
  搶話接話率 interruption TOR（FDB v1 的定義，越高越好）：助理停下後，在使用者搶話結束後
  `max_response_s` 內重新開口回應的比例；其回應延遲 = 開口幀 - 搶話結束幀。
- 回應延遲：每個使用者發言段結束 e 之後第一個開口 t ∈ [e, e + `max_response_s`]，延遲 (t - e)·0.04 秒；
  smooth TOR = 有回應的發言段比例（越高越好）。

`timeline_figure` 以 matplotlib（Agg）畫出使用者／助理的說話區段與事件（含圖例），
`plot_timeline` 存成 PNG 並回傳路徑。
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.data.interleave import FRAME_SECONDS, seconds_to_end_frame, seconds_to_frame

Interval = tuple[float, float]


@dataclass
class TurnTakingAnnotation:
    """一段對話的輪替標註（秒）。`barge_ins` 為 (起點, 搶話結束)。"""

    user_turns: list[Interval] = field(default_factory=list)
    pauses: list[Interval] = field(default_factory=list)
    backchannels: list[Interval] = field(default_factory=list)
    barge_ins: list[Interval] = field(default_factory=list)
    id: str = ""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TurnTakingAnnotation:
        """由對話清單列（turns、overlaps，可選 pauses）建立。

        使用者發言段 = speaker 為 user 且 kind 不是 backchannel 的 turn；附和 = by user 的
        backchannel overlap；搶話 = by user 的 barge_in overlap，結束取該使用者發言段的結束
        （找不到則取 overlap 的 end）；停頓取列中的 `pauses`（[{start, end, kind, text}]，沒有則為空）。
        """
        turns = row.get("turns")
        if turns is None:
            raise ValueError(f"{row.get('id', '?')}: 清單列缺少欄位 'turns'")
        user = [t for t in turns if t.get("speaker") == "user" and t.get("kind") != "backchannel"]
        ann = cls(id=str(row.get("id", "")))
        ann.user_turns = [(float(t["start"]), float(t["end"])) for t in user]
        ann.pauses = [(float(p["start"]), float(p["end"])) for p in row.get("pauses") or []]
        for o in row.get("overlaps", []):
            if o.get("by", "user") != "user":
                continue
            onset = float(o.get("onset", o["start"]))
            if o["kind"] == "backchannel":
                ann.backchannels.append((onset, float(o["end"])))
            elif o["kind"] == "barge_in":
                host = [e for s, e in ann.user_turns if abs(s - onset) < 1e-3]
                ann.barge_ins.append((onset, host[0] if host else float(o["end"])))
        return ann


@dataclass(frozen=True)
class TurnTakingConfig:
    """指標參數（幀為 40 ms）。"""

    min_speech_frames: int = 2
    min_silence_frames: int = 5
    pause_grace_s: float = 0.0
    backchannel_window_s: float = 0.5
    stop_window_s: float = 1.0
    max_response_s: float = 3.0


def activity_from_turns(
    turns: Sequence[dict[str, Any]], speaker: str, num_frames: int
) -> np.ndarray:
    """某位說話者的逐幀說話狀態 bool [N]（由標註的發言段 [floor(start/0.04), ceil(end/0.04)) 產生）。"""
    act = np.zeros(num_frames, dtype=bool)
    for t in turns:
        if t.get("speaker") == speaker:
            s = max(seconds_to_frame(t["start"]), 0)
            act[s : min(seconds_to_end_frame(t["end"]), num_frames)] = True
    return act


def _onsets(speaking: np.ndarray, min_run: int) -> np.ndarray:
    """所有開口幀（連續至少 min_run 幀為真的區段起點）。"""
    n = len(speaking)
    starts = [t for t in range(n) if speaking[t] and (t == 0 or not speaking[t - 1])]
    out = []
    for t in starts:
        run = 0
        while t + run < n and speaking[t + run]:
            run += 1
        if run >= min_run:
            out.append(t)
    return np.asarray(out, dtype=np.int64)


def _first_stop(speaking: np.ndarray, start: int, min_silence: int) -> int:
    """從 start（含）起第一個「連續 min_silence 幀無聲」的起點；超出 N 的幀視為無聲。"""
    n = len(speaking)
    t = max(start, 0)
    while t < n:
        end = min(t + min_silence, n)
        if not speaking[t:end].any():
            return t
        # 跳到這段窗內最後一個有聲幀之後
        t = t + int(np.flatnonzero(speaking[t:end])[-1]) + 1
    return n


def _rate(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def dialogue_events(
    ann: TurnTakingAnnotation, speaking: Any, config: TurnTakingConfig | None = None
) -> dict[str, Any]:
    """單段對話的逐事件結果（JSON 可序列化）。"""
    cfg = config or TurnTakingConfig()
    sp = np.asarray(speaking, dtype=bool).reshape(-1)
    n = len(sp)
    if n == 0:
        raise ValueError(f"{ann.id}: speaking 為空")
    onsets = _onsets(sp, cfg.min_speech_frames)
    fs = FRAME_SECONDS

    def onset_in(a: int, b: int) -> int | None:
        hit = onsets[(onsets >= a) & (onsets < b)]
        return int(hit[0]) if len(hit) else None

    pauses = []
    for a, b in ann.pauses:
        s, e = seconds_to_frame(a), seconds_to_end_frame(b) + int(round(cfg.pause_grace_s / fs))
        t = onset_in(s, e)
        pauses.append(
            {
                "start": a,
                "end": b,
                "takeover": t is not None,
                "onset_s": None if t is None else t * fs,
            }
        )
    bcs = []
    for a, b in ann.backchannels:
        s = seconds_to_frame(a)
        applicable = bool(0 <= s < n and sp[s])
        stop = _first_stop(sp, s, cfg.min_silence_frames) if applicable else None
        limit = seconds_to_end_frame(b) + int(round(cfg.backchannel_window_s / fs))
        bcs.append(
            {
                "start": a,
                "end": b,
                "applicable": applicable,
                "takeover": bool(applicable and stop < limit),
                "stop_s": None if stop is None else stop * fs,
            }
        )
    barges = []
    for a, b in ann.barge_ins:
        o = seconds_to_frame(a)
        applicable = bool(0 <= o < n and sp[o])
        ev: dict[str, Any] = {"onset": a, "end": b, "applicable": applicable}
        if applicable:
            stop = _first_stop(sp, o, cfg.min_silence_frames)
            lat = (stop - o) * fs
            end_f = seconds_to_end_frame(b)
            resp = onset_in(max(end_f, stop), end_f + int(round(cfg.max_response_s / fs)) + 1)
            ev.update(
                {
                    "stop_latency_s": lat,
                    "stopped": bool(lat <= cfg.stop_window_s + 1e-9),
                    "takeover": resp is not None,
                    "response_latency_s": None if resp is None else (resp - end_f) * fs,
                }
            )
        barges.append(ev)
    responses = []
    for a, b in ann.user_turns:
        e = seconds_to_end_frame(b)
        t = onset_in(e, e + int(round(cfg.max_response_s / fs)) + 1)
        responses.append(
            {
                "start": a,
                "end": b,
                "responded": t is not None,
                "latency_s": None if t is None else (t - e) * fs,
            }
        )
    return {
        "id": ann.id,
        "num_frames": n,
        "pauses": pauses,
        "backchannels": bcs,
        "barge_ins": barges,
        "responses": responses,
    }


def turn_taking_metrics(
    annotations: Sequence[TurnTakingAnnotation],
    activities: Sequence[Any],
    config: TurnTakingConfig | None = None,
) -> dict[str, Any]:
    """多段對話的輪替指標（事件合併後計算；沒有適用事件的比率為 None）。"""
    if len(annotations) != len(activities):
        raise ValueError(f"標註 {len(annotations)} 段、說話狀態 {len(activities)} 段，數量不同")
    per = [dialogue_events(a, s, config) for a, s in zip(annotations, activities)]
    pauses = [p for d in per for p in d["pauses"]]
    bcs = [b for d in per for b in d["backchannels"] if b["applicable"]]
    barges = [b for d in per for b in d["barge_ins"] if b["applicable"]]
    resp = [r for d in per for r in d["responses"]]
    stop_lat = [b["stop_latency_s"] for b in barges]
    int_lat = [b["response_latency_s"] for b in barges if b["takeover"]]
    lat = [r["latency_s"] for r in resp if r["responded"]]
    return {
        "pause": {
            "events": len(pauses),
            "tor": _rate(sum(p["takeover"] for p in pauses), len(pauses)),
        },
        "backchannel": {
            "events": len(bcs),
            "not_applicable": sum(len(d["backchannels"]) for d in per) - len(bcs),
            "tor": _rate(sum(b["takeover"] for b in bcs), len(bcs)),
        },
        "interruption": {
            "events": len(barges),
            "not_applicable": sum(len(d["barge_ins"]) for d in per) - len(barges),
            "stop_rate": _rate(sum(b["stopped"] for b in barges), len(barges)),
            "stop_latency_mean_s": _mean(stop_lat),
            "stop_latency_median_s": float(np.median(stop_lat)) if stop_lat else None,
            "tor": _rate(sum(b["takeover"] for b in barges), len(barges)),
            "response_latency_mean_s": _mean(int_lat),
        },
        "turn_taking": {
            "events": len(resp),
            "tor": _rate(len(lat), len(resp)),
            "response_latency_mean_s": _mean(lat),
            "response_latency_median_s": float(np.median(lat)) if lat else None,
        },
        "dialogues": per,
    }


def timeline_figure(
    ann: TurnTakingAnnotation,
    speaking: Any,
    user_activity: Any | None = None,
    title: str | None = None,
) -> Any:
    """一段對話的時間軸圖（matplotlib `Figure`）：使用者（標註或 `user_activity`）與助理的
    說話區段，停頓（灰底）、附和（綠）、搶話起點（紅線），圖例標出這些圖元。"""
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib

    matplotlib.use("Agg", force=False)
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    sp = np.asarray(speaking, dtype=bool).reshape(-1)
    n = len(sp)
    fs = FRAME_SECONDS

    def runs(act: np.ndarray) -> list[tuple[float, float]]:
        out, t = [], 0
        while t < len(act):
            if act[t]:
                u = t
                while u < len(act) and act[u]:
                    u += 1
                out.append((t * fs, (u - t) * fs))
                t = u
            else:
                t += 1
        return out

    if user_activity is None:
        user_runs = [(a, b - a) for a, b in ann.user_turns]
    else:
        user_runs = runs(np.asarray(user_activity, dtype=bool).reshape(-1))
    fig, ax = plt.subplots(figsize=(max(6.0, n * fs / 3), 2.6))
    ax.broken_barh(user_runs, (10, 8), facecolors="tab:blue")
    ax.broken_barh([(a, b - a) for a, b in ann.backchannels], (10, 8), facecolors="tab:green")
    ax.broken_barh(runs(sp), (0, 8), facecolors="tab:orange")
    for a, b in ann.pauses:
        ax.axvspan(a, b, color="0.85", zorder=0)
    for a, _ in ann.barge_ins:
        ax.axvline(a, color="tab:red", lw=1.5)
    handles = [
        Patch(color="tab:blue", label="user speech"),
        Patch(color="tab:green", label="user backchannel"),
        Patch(color="tab:orange", label="assistant speaking (model)"),
        Patch(color="0.85", label="user pause"),
        Line2D([], [], color="tab:red", lw=1.5, label="barge-in onset"),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
        frameon=False,
    )
    ax.set_yticks([4, 14], labels=["assistant", "user"])
    ax.set_xlim(0, n * fs)
    ax.set_xlabel("time (s)")
    if title or ann.id:
        ax.set_title(title or ann.id)
    fig.tight_layout()
    return fig


def plot_timeline(
    ann: TurnTakingAnnotation,
    speaking: Any,
    path: str | os.PathLike,
    user_activity: Any | None = None,
    title: str | None = None,
) -> Path:
    """畫出 `timeline_figure` 的時間軸並存成 PNG，回傳路徑。"""
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib.pyplot as plt

    fig = timeline_figure(ann, speaking, user_activity, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out
