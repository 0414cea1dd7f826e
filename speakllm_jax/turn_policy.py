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
- 停止的平滑：停止機率再取最近 `stop_smooth_frames` 幀的平均，且這一輪要累積滿這麼多幀才可能
  停止（開口與讓出只用 `smooth_frames`，保持快速）；附和造成的短暫下探不會結束這一輪。
- 重疊時（呼叫端告知使用者正在助理說話時出聲，`overlap=True`，例如伺服器停住音訊等判定的期間）：
  `overlap_stop_threshold` > 0 時停止改用這個（較高的）門檻，1.0 即只有 yield 能結束這一輪；
  `overlap_yield_threshold` > 0 時讓出改用這個（較低的）門檻。重疊結束後停止的平滑重新累積
  （附和後同一輪照常說下去）。兩者為 0 時 `overlap` 不改變決策。
- 冷卻：結束一輪（停止、讓出或外部結束）後 `cooldown_frames` 幀內不開口，除非呼叫端告知使用者的
  輪次已結束（`end_cooldown()`，例如伺服器的 VAD 判定使用者說完）。
- `allow_start=False`（例如伺服器在被打斷後、使用者說完之前）時不開口。

JAX 串流推論與孿生沒有 VAD：`overlap` 恆為 False、不呼叫 `end_cooldown`，兩者的決策仍逐幀相同。
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
    stop_smooth_frames: int = 1
    cooldown_frames: int = 0
    overlap_stop_threshold: float = 0.0
    overlap_yield_threshold: float = 0.0

    def __post_init__(self) -> None:
        for k in ("start_threshold", "stop_threshold", "yield_threshold"):
            if not 0.0 < getattr(self, k) <= 1.0:
                raise ValueError(f"{k} 必須在 (0, 1]，得到 {getattr(self, k)}")
        if self.start_threshold + self.stop_threshold <= 1.0:
            raise ValueError(
                "start_threshold + stop_threshold 必須 > 1（遲滯），得到 "
                f"{self.start_threshold} + {self.stop_threshold}"
            )
        for k in ("min_speak_frames", "smooth_frames", "stop_smooth_frames"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} 必須 ≥ 1，得到 {getattr(self, k)}")
        for k in ("overlap_stop_threshold", "overlap_yield_threshold"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} 必須在 [0, 1]（0：不另設），得到 {getattr(self, k)}")
        if self.cooldown_frames < 0:
            raise ValueError(f"cooldown_frames 必須 ≥ 0，得到 {self.cooldown_frames}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "turn_rule") -> TurnRule:
        """由字典（或 ConfigDict）建立；未知欄位或不合理的值拋出指名欄位的 ValueError。"""
        d = dict(d or {})
        check_rule_names(d, source)
        try:
            return cls(**{k: _coerce(type(getattr(cls, k)), v, k) for k, v in d.items()})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


def _coerce(kind: type, value: Any, name: str) -> Any:
    """欄位值轉成欄位的型別（命令列覆寫給的是字串）；整數欄位不接受小數。"""
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} 必須是整數，得到 {value}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} 必須是 {kind.__name__}，得到 {value!r}") from None


def check_rule_names(d: Any, source: str = "--turn_rule") -> None:
    """只檢查欄位名稱（值要與其他欄位合併後才能檢查遲滯）；未知欄位拋出 ValueError。"""
    names = {f.name for f in fields(TurnRule)}
    bad = sorted(set(dict(d or {})) - names)
    if bad:
        raise ValueError(f"{source} 有未知欄位 {bad}；可用 {sorted(names)}")


def parse_overrides(items: Sequence[str], source: str = "--turn_rule") -> dict[str, str]:
    """命令列的 `KEY=VALUE` 串 → 字典（值留給 `TurnRule.from_dict` 轉型與檢查）。"""
    out: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{source} {part!r}：格式是 KEY=VALUE")
            out[key.strip()] = value.strip()
    return out


def softmax(logits: Sequence[float]) -> list[float]:
    """數值穩定的 softmax（純 Python）。"""
    xs = [float(x) for x in logits]
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    s = sum(es)
    return [e / s for e in es]


class TurnDecider:
    """一條串流的決策狀態（是否在說話、這一輪已說幾幀、平滑用的最近機率、冷卻剩幾幀）。"""

    def __init__(self, rule: TurnRule | None = None) -> None:
        self.rule = rule or TurnRule()
        self._hist: deque[list[float]] = deque(maxlen=self.rule.smooth_frames)
        self._stop_hist: deque[float] = deque(maxlen=self.rule.stop_smooth_frames)
        self.speaking = False
        self.frames = 0
        self.cooldown = 0

    def stop(self) -> None:
        """結束了這一輪（自己的停止或讓出，或外部例如伺服器的快速路徑判定打斷）：回到聆聽、開始冷卻。"""
        self.speaking = False
        self.frames = 0
        self._stop_hist.clear()
        self.cooldown = self.rule.cooldown_frames

    def end_cooldown(self) -> None:
        """使用者的輪次已結束（呼叫端判定）：不再冷卻。"""
        self.cooldown = 0

    def step(self, logits: Sequence[float], allow_start: bool = True, overlap: bool = False) -> int:
        """吃一幀的輪替 logits `[5]`，回傳這一幀的動作（`TurnAction` 的值）。

        `overlap`：使用者此刻在助理說話時出聲（`overlap_*_threshold` 的門檻）。"""
        self._hist.append(softmax(logits))
        n = len(self._hist)
        p = [sum(h[i] for h in self._hist) / n for i in range(len(self._hist[0]))]
        r = self.rule
        if not self.speaking:
            if self.cooldown > 0:
                self.cooldown -= 1
                return _LISTEN
            talk = sum(p[a] for a in SPEAKING_ACTIONS)
            if allow_start and talk >= r.start_threshold:
                self.speaking, self.frames = True, 1
                return _SPEAK
            return _LISTEN
        self.frames += 1
        overlap_yield = overlap and r.overlap_yield_threshold > 0
        if p[_YIELD] >= (r.overlap_yield_threshold if overlap_yield else r.yield_threshold):
            self.stop()
            return _YIELD
        if overlap and r.overlap_stop_threshold:
            self._stop_hist.clear()
            stop_now = p[_LISTEN] + p[_YIELD] >= r.overlap_stop_threshold
            if self.frames > r.min_speak_frames and stop_now:
                self.stop()
                return _LISTEN
            return _CONTINUE
        self._stop_hist.append(p[_LISTEN] + p[_YIELD])
        stop_p = sum(self._stop_hist) / len(self._stop_hist)
        full = len(self._stop_hist) == r.stop_smooth_frames
        if self.frames > r.min_speak_frames and full and stop_p >= r.stop_threshold:
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
