"""輪替頭的決策規則（唯一的一份）：每幀的輪替 logits → 這一幀的輪替動作。

JAX 串流推論（`speakllm_jax.models.streaming.run_streaming`）、PyTorch 孿生（`export.torch_model`
的 `stream` 與 `Streamer` 的使用者）與伺服器的 `policy="model"`（`export.serving.session`）都用這裡的
`TurnDecider`；規則的常數是 `TurnRule`，匯出時寫進 `heads_config.json` 的 `turn_rule`，服務端讀同一份。
純 Python（不匯入 jax、numpy 或 torch），位於層級最底層。

規則（p 為這一幀 softmax 後、再對最近 `smooth_frames` 幀取平均的機率）：

- 聆聽中：說話機率 p(speak) + p(continue) + p(backchannel) ≥ `start_threshold` 就開口（SPEAK）。
  輪替頭的 SPEAK 目標每輪只有一幀（其餘是 LISTEN），所以 argmax 幾乎不會選到它；門檻取代 argmax。
- 說話中：p(yield) ≥ `yield_threshold` 立即讓出（YIELD）；說滿 `min_speak_frames` 幀之後，
  停止機率 p(listen) + p(yield) ≥ `stop_threshold` 就結束這一輪（LISTEN）；否則繼續（CONTINUE）。
  停止機率 = 1 − 說話機率，所以必須 `start_threshold + stop_threshold > 1`（遲滯）：否則說話機率
  落在 [start, 1 − stop] 的幀會「剛停就開口」，助理說說停停（`TurnRule` 建立時檢查）。
- `allow_start=False`（例如伺服器在被打斷後、使用者說完之前）時不開口。
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from speakllm_jax.labels import SPEAKING_ACTIONS, TurnAction

_LISTEN = int(TurnAction.LISTEN)
_SPEAK = int(TurnAction.SPEAK)
_CONTINUE = int(TurnAction.CONTINUE)
_YIELD = int(TurnAction.YIELD)


@dataclass(frozen=True)
class TurnRule:
    """決策規則的常數（`heads_config.json` 的 `turn_rule`、訓練設定的 `turn_rule`）。"""

    start_threshold: float = 0.3
    stop_threshold: float = 0.8
    yield_threshold: float = 0.5
    min_speak_frames: int = 25
    smooth_frames: int = 1

    def __post_init__(self) -> None:
        for k in ("start_threshold", "stop_threshold", "yield_threshold"):
            if not 0.0 < getattr(self, k) <= 1.0:
                raise ValueError(f"{k} 必須在 (0, 1]，得到 {getattr(self, k)}")
        if self.start_threshold + self.stop_threshold <= 1.0:
            raise ValueError(
                "start_threshold + stop_threshold 必須 > 1（遲滯），得到 "
                f"{self.start_threshold} + {self.stop_threshold}"
            )
        if self.min_speak_frames < 1 or self.smooth_frames < 1:
            raise ValueError("min_speak_frames 與 smooth_frames 必須 ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "turn_rule") -> TurnRule:
        """由字典（或 ConfigDict）建立；未知欄位或不合理的值拋出指名欄位的 ValueError。"""
        names = {f.name for f in fields(cls)}
        d = dict(d or {})
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"{source} 有未知欄位 {bad}；可用 {sorted(names)}")
        try:
            return cls(**{k: type(getattr(cls, k))(v) for k, v in d.items()})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


def softmax(logits: Sequence[float]) -> list[float]:
    """數值穩定的 softmax（純 Python）。"""
    xs = [float(x) for x in logits]
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    s = sum(es)
    return [e / s for e in es]


class TurnDecider:
    """一條串流的決策狀態（是否在說話、這一輪已說幾幀、平滑用的最近機率）。"""

    def __init__(self, rule: TurnRule | None = None) -> None:
        self.rule = rule or TurnRule()
        self._hist: deque[list[float]] = deque(maxlen=self.rule.smooth_frames)
        self.speaking = False
        self.frames = 0

    def stop(self) -> None:
        """外部結束了這一輪（例如伺服器的快速路徑判定打斷）：回到聆聽。"""
        self.speaking = False
        self.frames = 0

    def step(self, logits: Sequence[float], allow_start: bool = True) -> int:
        """吃一幀的輪替 logits `[5]`，回傳這一幀的動作（`TurnAction` 的值）。"""
        self._hist.append(softmax(logits))
        n = len(self._hist)
        p = [sum(h[i] for h in self._hist) / n for i in range(len(self._hist[0]))]
        r = self.rule
        if not self.speaking:
            talk = sum(p[a] for a in SPEAKING_ACTIONS)
            if allow_start and talk >= r.start_threshold:
                self.speaking, self.frames = True, 1
                return _SPEAK
            return _LISTEN
        self.frames += 1
        if p[_YIELD] >= r.yield_threshold:
            self.stop()
            return _YIELD
        if self.frames > r.min_speak_frames and p[_LISTEN] + p[_YIELD] >= r.stop_threshold:
            self.stop()
            return _LISTEN
        return _CONTINUE


def decide_all(turn_logits: Sequence[Sequence[float]], rule: TurnRule | None = None) -> list[int]:
    """整段逐幀的輪替 logits `[N, 5]` → 每幀的動作（自由執行以外的離線用途，例如調門檻）。"""
    d = TurnDecider(rule)
    return [d.step(row) for row in turn_logits]


def is_speaking(action: int) -> bool:
    """這個動作的幀助理出聲（輸出語音碼）。"""
    return int(action) in SPEAKING_ACTIONS
