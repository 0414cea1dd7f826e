"""輪替指標：手工標註的小對話（每個數字都在註解裡手算），以及示範對話上的標註即答案（oracle）檢查。"""

from __future__ import annotations

import json

import numpy as np
import pytest

from speakllm_jax.data.adapters import run_adapter
from speakllm_jax.data.demo_corpus import ensure_demo_corpus, has_espeak
from speakllm_jax.eval.turn_taking import (
    TurnTakingAnnotation,
    TurnTakingConfig,
    activity_from_turns,
    dialogue_events,
    plot_timeline,
    timeline_figure,
    turn_taking_metrics,
)

CFG = TurnTakingConfig(
    min_speech_frames=2,
    min_silence_frames=5,
    backchannel_window_s=0.5,
    stop_window_s=1.0,
    max_response_s=3.0,
)


def _act(n: int, *runs: tuple[int, int]) -> np.ndarray:
    a = np.zeros(n, dtype=bool)
    for s, e in runs:
        a[s:e] = True
    return a


# 對話 A（停頓）：N = 50；使用者 [0, 0.4) → 結束幀 10；停頓 [0.4, 0.8) = 幀 [10, 20)、
# [1.2, 1.6) = 幀 [30, 40)。助理在 12..13 說了 2 幀（>= 2，算開口）、在 35 只說 1 幀（不算）。
ANN_A = TurnTakingAnnotation(user_turns=[(0.0, 0.4)], pauses=[(0.4, 0.8), (1.2, 1.6)], id="A")
ACT_A = _act(50, (12, 14), (35, 36))
# 對話 B（附和與搶話）：N = 100；助理說 0..31、40..59、80..89。
# 附和 1 [0.4, 0.6) = 幀 [10, 15)：第一次停下在 32，界限 15 + round(0.5/0.04)=12 → 27，32 >= 27 → 沒讓
# 附和 2 [1.0, 1.2) = 幀 [25, 30)：停下在 32 < 30 + 12 = 42 → 讓了（接話）
# 附和 3 [2.8, 3.0) = 幀 [70, 75)：助理本來就沒在說 → 不適用
# 搶話 (2.0, 2.2)：起點幀 50，助理說到 59 → 停下在 60，停止延遲 (60 - 50)·0.04 = 0.4 s <= 1.0；
# 搶話結束幀 55，之後第一個開口在 80 → 回應延遲 (80 - 55)·0.04 = 1.0 s
ANN_B = TurnTakingAnnotation(
    user_turns=[(2.0, 2.2)],
    backchannels=[(0.4, 0.6), (1.0, 1.2), (2.8, 3.0)],
    barge_ins=[(2.0, 2.2)],
    id="B",
)
ACT_B = _act(100, (0, 32), (40, 60), (80, 90))
# 對話 C（沒停下的搶話）：助理 0..99 一直說；搶話起點 0.4 → 幀 10，停下在 N = 100 →
# 延遲 (100 - 10)·0.04 = 3.6 s > 1.0；之後沒有開口 → 沒接話
ANN_C = TurnTakingAnnotation(barge_ins=[(0.4, 0.6)], id="C")
ACT_C = _act(100, (0, 100))


def test_single_dialogue_events_by_hand():
    a = dialogue_events(ANN_A, ACT_A, CFG)
    assert [p["takeover"] for p in a["pauses"]] == [True, False]
    assert a["pauses"][0]["onset_s"] == pytest.approx(12 * 0.04)
    # 使用者結束幀 10，第一個開口 12 → 0.08 s
    assert a["responses"][0]["latency_s"] == pytest.approx(0.08)
    b = dialogue_events(ANN_B, ACT_B, CFG)
    assert [x["applicable"] for x in b["backchannels"]] == [True, True, False]
    assert [x["takeover"] for x in b["backchannels"]] == [False, True, False]
    ev = b["barge_ins"][0]
    assert ev["stop_latency_s"] == pytest.approx(0.4) and ev["stopped"]
    assert ev["takeover"] and ev["response_latency_s"] == pytest.approx(1.0)
    assert b["responses"][0]["latency_s"] == pytest.approx(1.0)


def test_pooled_metrics_by_hand():
    m = turn_taking_metrics([ANN_A, ANN_B, ANN_C], [ACT_A, ACT_B, ACT_C], CFG)
    assert m["pause"] == {"events": 2, "tor": 0.5}  # 1 / 2
    assert m["backchannel"] == {"events": 2, "not_applicable": 1, "tor": 0.5}  # 1 / 2
    it = m["interruption"]
    assert it["events"] == 2 and it["not_applicable"] == 0
    assert it["stop_rate"] == 0.5  # B 停了、C 沒停
    assert it["stop_latency_mean_s"] == pytest.approx((0.4 + 3.6) / 2)
    assert it["stop_latency_median_s"] == pytest.approx(2.0)
    assert it["tor"] == 0.5 and it["response_latency_mean_s"] == pytest.approx(1.0)
    tt = m["turn_taking"]
    # 使用者發言段：A（0.08 s）與 B（1.0 s）都有回應
    assert tt["events"] == 2 and tt["tor"] == 1.0
    assert tt["response_latency_mean_s"] == pytest.approx((0.08 + 1.0) / 2)
    json.dumps(m)  # 可序列化
    empty = turn_taking_metrics([TurnTakingAnnotation()], [np.zeros(10, bool)], CFG)
    assert empty["pause"]["tor"] is None and empty["interruption"]["stop_rate"] is None
    with pytest.raises(ValueError):
        turn_taking_metrics([ANN_A], [], CFG)


def test_min_run_parameters_change_the_outcome():
    # 同一段停頓：若 1 幀就算開口，停頓 2 也被判為接話 → TOR 由 1/2 變 2/2
    loose = TurnTakingConfig(min_speech_frames=1, min_silence_frames=5)
    assert turn_taking_metrics([ANN_A], [ACT_A], loose)["pause"]["tor"] == 1.0
    # 附和 1：若 25 幀的無聲才算停下，B 的 8 幀空檔不再算讓話 → TOR 0 / 2
    strict = TurnTakingConfig(min_speech_frames=2, min_silence_frames=25)
    assert turn_taking_metrics([ANN_B], [ACT_B], strict)["backchannel"]["tor"] == 0.0


def test_plot_timeline(tmp_path):
    out = plot_timeline(ANN_B, ACT_B, tmp_path / "plots" / "b.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_timeline_has_legend_for_every_mark():
    import matplotlib.pyplot as plt

    fig = timeline_figure(ANN_B, ACT_B)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [
        "user speech",
        "user backchannel",
        "assistant speaking (model)",
        "user pause",
        "barge-in onset",
    ]
    plt.close(fig)


@pytest.mark.skipif(not has_espeak(), reason="需要 espeak-ng")
def test_oracle_on_demo_dialogues(tmp_path_factory):
    root = ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")
    rows = run_adapter("dialogue", root / "dialogues")
    anns, acts = [], []
    for r in rows:
        n = int(np.ceil(r["duration"] / 0.04 - 1e-9))
        anns.append(TurnTakingAnnotation.from_row(r))
        acts.append(activity_from_turns(r["turns"], "assistant", n))
    m = turn_taking_metrics(anns, acts, CFG)
    # 示範對話：助理在搶話 0.25 s 後停下 → 停止延遲介於 0.24 與 0.32 s（幀化誤差 < 2 幀）
    it = m["interruption"]
    assert it["events"] == len(rows) and it["stop_rate"] == 1.0
    for d in m["dialogues"]:
        assert 0.24 - 1e-9 <= d["barge_ins"][0]["stop_latency_s"] <= 0.32 + 1e-9
    # 搶話後助理在使用者說完 0.3–0.7 s 後回應
    assert it["tor"] == 1.0 and 0.24 <= it["response_latency_mean_s"] <= 0.76
    # 附和時助理繼續說 → 不接話
    assert m["backchannel"]["events"] == len(rows) and m["backchannel"]["tor"] == 0.0
    # 第一句使用者話後 0.3–0.8 s 助理回答
    first = [d["responses"][0]["latency_s"] for d in m["dialogues"]]
    assert all(0.24 <= x <= 0.84 for x in first)
    assert m["turn_taking"]["tor"] == 1.0
