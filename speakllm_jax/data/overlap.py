"""重疊感知（Overlap-Aware）的逐幀輪替目標與權重（NumPy，資料端產生）。

`overlap_aware_targets` 由一段對話的 turns／overlaps 產生 `turn_targets [N]`、`speech_weight [N]`、
`turn_weight [N]`（助理的觀點，25 Hz 幀格）；訓練的損失項在 `speakllm_jax.training.losses`。

- 預設每幀為 LISTEN；助理的每個發言段 [s, e) 在 s 為 SPEAK、(s, e) 為 CONTINUE；
  助理自己的附和（turn kind 為 "backchannel"，或 overlaps 中 by="assistant" 的 backchannel）為 BACKCHANNEL。
- 使用者搶話（overlap kind "barge_in"，by="user"）且起點 o 落在助理發言段 [s, e) 內：
  幀 [o, o + R) 為 YIELD（R = `reaction_frames`），其後到該發言段結束 [o + R, e) 為 LISTEN，
  且 `speech_weight` 在 [o + R, e) 為 0（助理不該再說的語音不當作目標）。
  搶話起點不在助理發言段內時（助理本來就沒在說）不做任何改變。
- 使用者附和（overlap kind "backchannel"，by="user"）不改變目標與語音權重：助理繼續說（CONTINUE）。
- `turn_weight`：搶話幀 [o, o + R) 與搶話重疊段為 `barge_in_weight`，使用者附和的重疊段為
  `backchannel_weight`，其餘為 1（兩者重疊時取較大者）。
- `ablation=True`：不做重疊處理，所有助理發言段都是 SPEAK／CONTINUE，其餘 LISTEN，兩種權重全為 1。
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from speakllm_jax.data.interleave import seconds_to_end_frame, seconds_to_frame
from speakllm_jax.labels import TurnAction


@dataclass(frozen=True)
class OverlapConfig:
    """重疊感知損失的設定。

    `reaction_frames`：搶話後允許的反應時間（幀），其間目標為 YIELD；
    `barge_in_weight`／`backchannel_weight`：輪替損失在兩種重疊幀上的權重；
    `ablation`：True 時關掉整個模組（純輪替目標、權重全 1）。
    """

    reaction_frames: int = 6
    barge_in_weight: float = 2.0
    backchannel_weight: float = 1.5
    ablation: bool = False


@dataclass
class FrameTargets:
    """逐幀輪替目標與權重（長度都是 N）。"""

    turn_targets: np.ndarray  # [N] int32，TurnAction
    speech_weight: np.ndarray  # [N] float32
    turn_weight: np.ndarray  # [N] float32
    barge_in_frames: np.ndarray  # [B] int64，實際生效的搶話起點幀


def _span(turn: dict[str, Any], n: int) -> tuple[int, int]:
    s = min(max(seconds_to_frame(turn["start"]), 0), n)
    e = min(max(seconds_to_end_frame(turn["end"]), s), n)
    return s, e


def _check_turn(turn: Any, i: int) -> None:
    if not isinstance(turn, dict):
        raise ValueError(f"turns[{i}] 應為 dict，得到 {type(turn).__name__}")
    for k in ("speaker", "start", "end"):
        if k not in turn:
            raise ValueError(f"turns[{i}] 缺少欄位 {k!r}")
    if float(turn["end"]) < float(turn["start"]):
        raise ValueError(f"turns[{i}] 的 end {turn['end']} 早於 start {turn['start']}")


def overlap_aware_targets(
    turns: Sequence[dict[str, Any]],
    overlaps: Sequence[dict[str, Any]],
    num_frames: int,
    config: OverlapConfig | None = None,
    assistant: str = "assistant",
) -> FrameTargets:
    """由一段對話的 turns／overlaps 產生逐幀的輪替目標、語音權重與輪替權重（規則見模組說明）。"""
    cfg = config or OverlapConfig()
    n = int(num_frames)
    if n <= 0:
        raise ValueError(f"num_frames 必須 > 0，收到 {num_frames}")
    if cfg.reaction_frames < 1:
        raise ValueError(f"reaction_frames 必須 >= 1，收到 {cfg.reaction_frames}")
    targets = np.full(n, int(TurnAction.LISTEN), dtype=np.int32)
    speech_w = np.ones(n, dtype=np.float32)
    turn_w = np.ones(n, dtype=np.float32)
    a_spans: list[tuple[int, int]] = []
    for i, t in enumerate(turns):
        _check_turn(t, i)
        if t["speaker"] != assistant:
            continue
        s, e = _span(t, n)
        if e <= s:
            continue
        a_spans.append((s, e))
        if t.get("kind") == "backchannel" and not cfg.ablation:
            targets[s:e] = int(TurnAction.BACKCHANNEL)
        else:
            targets[s] = int(TurnAction.SPEAK)
            targets[s + 1 : e] = int(TurnAction.CONTINUE)
    barge: list[int] = []
    if cfg.ablation:
        return FrameTargets(targets, speech_w, turn_w, np.zeros(0, dtype=np.int64))
    for j, o in enumerate(overlaps):
        if not isinstance(o, dict) or "kind" not in o or "start" not in o or "end" not in o:
            raise ValueError(f"overlaps[{j}] 需要欄位 kind、start、end")
        kind = o["kind"]
        by = o.get("by", "user")
        s, e = _span(o, n)
        if kind == "backchannel":
            if by == assistant:
                targets[s:e] = int(TurnAction.BACKCHANNEL)
            else:
                turn_w[s:e] = np.maximum(turn_w[s:e], cfg.backchannel_weight)
        elif kind == "barge_in":
            if by == assistant:
                continue  # 助理搶使用者的話：不在本模組的範圍
            onset = min(max(seconds_to_frame(o.get("onset", o["start"])), 0), n - 1)
            host = [(a, b) for a, b in a_spans if a <= onset < b]
            if not host:
                continue
            _, end = host[0]
            r_end = min(onset + cfg.reaction_frames, n)
            targets[onset:r_end] = int(TurnAction.YIELD)
            targets[r_end:end] = int(TurnAction.LISTEN)
            speech_w[r_end:end] = 0.0
            turn_w[onset:r_end] = np.maximum(turn_w[onset:r_end], cfg.barge_in_weight)
            turn_w[s:e] = np.maximum(turn_w[s:e], cfg.barge_in_weight)
            barge.append(onset)
        else:
            raise ValueError(f"overlaps[{j}] 的 kind {kind!r} 不是 backchannel 或 barge_in")
    return FrameTargets(targets, speech_w, turn_w, np.asarray(barge, dtype=np.int64))
