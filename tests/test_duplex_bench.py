"""FDB v1 式輪替指標：手工時間軸（每個數字都在註解裡手算），以及輪替示範對話的標註即答案檢查。"""

from __future__ import annotations

import json

import numpy as np
import pytest

from speakllm_jax.eval.duplex_bench import (
    METRIC_KEYS,
    BenchConfig,
    activity_from_frames,
    audio_segments,
    bench_metrics,
    check_report,
    markdown_table,
    plot_duplex_timeline,
)
from speakllm_jax.eval.turn_taking import TurnTakingAnnotation, activity_from_turns

CFG = BenchConfig()


def _act(n: int, *runs: tuple[int, int]) -> np.ndarray:
    a = np.zeros(n, dtype=bool)
    for s, e in runs:
        a[s:e] = True
    return a


# D1（zh）：使用者 [0, 1.6) 含停頓 [0.6, 1.0) = 幀 [15, 25)，再說 [4.0, 4.8)。
# 助理 16..41（26 幀 ≥ 25）起點 16 在停頓內 → 停頓被接話；它在 1.6 之前就開始，不算回應。
# 助理 45..79（35 幀）起點 45 → 回應 [0, 1.6)，延遲 45·40 − 1600 = 200 ms。
# 助理 130..139 只有 10 幀（< 1 秒）→ [4.0, 4.8) 沒有被接話。
ANN_1 = TurnTakingAnnotation(user_turns=[(0.0, 1.6), (4.0, 4.8)], pauses=[(0.6, 1.0)], id="D1")
ACT_1 = _act(150, (16, 42), (45, 80), (130, 140))
# D2（en）：助理 0..59、70..89、100..129、140..169。
# 附和 [0.8, 1.0)：幀 20 時在說，音訊段到 60 ≥ ceil(1.0/0.04) + 5 = 30 → 沒讓；[20, 50) 內沒有
# 接話起點 → 忽略了附和（好）。
# 附和 [3.2, 3.5)：幀 80 在說，音訊段在 90 結束 < ceil(3.5/0.04) + 5 = 93 → 讓出（壞）；
# 100..129 起點 100 在 [80, 113) 內也是接話，同一事件只算一次。
# 搶話 6.0（幀 150）：音訊段在 170 結束 → 停止 170·40 − 6000 = 800 ms ≤ 1000 → 讓出（晚）。
ANN_2 = TurnTakingAnnotation(backchannels=[(0.8, 1.0), (3.2, 3.5)], barge_ins=[(6.0, 6.8)], id="D2")
ACT_2 = _act(200, (0, 60), (70, 90), (100, 130), (140, 170))
# D3（語碼轉換）：助理 0..79；搶話 1.0（幀 25）→ 停止 80·40 − 1000 = 2200 ms > 1000 → 沒讓；
# 搶話 5.0 時助理沒在說 → 不適用。停頓 [4.0, 4.6) 內只有 8 幀（102..109）→ 沒被接話。
ANN_3 = TurnTakingAnnotation(pauses=[(4.0, 4.6)], barge_ins=[(1.0, 2.0), (5.0, 5.5)], id="D3")
ACT_3 = _act(150, (0, 80), (102, 110))


def test_segments_and_frames() -> None:
    assert audio_segments(np.array([1, 1, 0, 1, 1], bool), 1) == [(0, 5)]
    assert audio_segments(np.array([1, 1, 0, 0, 1], bool), 1) == [(0, 2), (4, 5)]
    assert audio_segments(np.zeros(4, bool)) == []
    assert activity_from_frames([3, 1, 3], 2).tolist() == [False, True, False, True]
    assert activity_from_frames([], 3).tolist() == [False] * 3


def test_metrics_on_hand_built_timelines() -> None:
    m = bench_metrics([ANN_1, ANN_2, ANN_3], [ACT_1, ACT_2, ACT_3], ["zh", "en", "mixed"], CFG)
    assert m["pause_takeover_rate"] == 0.5  # D1 的停頓被接話，D3 沒有
    assert m["backchannel_takeover_rate"] == 0.5  # D2：一個忽略、一個讓出 + 接話
    assert m["smooth_takeover_rate"] == 0.5
    assert m["smooth_latency_ms_p50"] == 200.0
    assert m["smooth_latency_ms_p90"] == 200.0
    assert m["interruption_yield_rate"] == 0.5  # 800 ms 讓出，2200 ms 沒讓
    assert m["interruption_stop_ms_p50"] == 1500.0  # (800 + 2200) / 2
    assert m["events"] == {
        "pauses": 2,
        "backchannels": 2,
        "backchannels_while_speaking": 2,
        "turn_ends": 2,
        "interruptions": 3,
        "interruptions_applicable": 2,
    }
    bl = m["by_language"]
    assert set(bl) == {"zh", "en", "cs"}
    assert bl["zh"]["pause_takeover_rate"] == 1.0
    assert bl["zh"]["smooth_latency_ms_p50"] == 200.0
    assert bl["zh"]["interruption_yield_rate"] is None
    assert bl["en"]["backchannel_takeover_rate"] == 0.5
    assert bl["en"]["interruption_yield_rate"] == 1.0
    assert bl["en"]["interruption_stop_ms_p50"] == 800.0
    assert bl["cs"]["pause_takeover_rate"] == 0.0
    assert bl["cs"]["interruption_yield_rate"] == 0.0
    assert bl["cs"]["interruption_stop_ms_p50"] == 2200.0
    d2 = m["dialogues"][1]["backchannels"]
    assert [(b["yielded"], b["takeover"], b["bad"]) for b in d2] == [
        (False, False, False),
        (True, True, True),
    ]


def test_takeover_rule_and_config() -> None:
    # 24 幀（0.96 秒）不算接話，25 幀（1 秒）算。
    ann = TurnTakingAnnotation(pauses=[(0.0, 0.4)])
    assert bench_metrics([ann], [_act(60, (2, 26))], ["zh"])["pause_takeover_rate"] == 0.0
    assert bench_metrics([ann], [_act(60, (2, 27))], ["zh"])["pause_takeover_rate"] == 1.0
    loose = BenchConfig(takeover_s=0.4)
    assert bench_metrics([ann], [_act(60, (2, 26))], ["zh"], loose)["pause_takeover_rate"] == 1.0
    # 回應必須在下一段使用者發言開始之前：[0, 1) 之後 1.2 又開口，2.0 才接話 → 不算。
    ann2 = TurnTakingAnnotation(user_turns=[(0.0, 1.0), (1.2, 1.6)])
    m = bench_metrics([ann2], [_act(120, (50, 80))], ["en"])
    assert [s["takeover"] for s in m["dialogues"][0]["smooth"]] == [False, True]
    # 沒有任何事件：比率都是 None。
    empty = bench_metrics([TurnTakingAnnotation()], [np.zeros(5, bool)], ["zh"])
    assert all(empty[k] is None for k in METRIC_KEYS)
    with pytest.raises(ValueError, match="數量不同"):
        bench_metrics([ANN_1], [], ["zh"])


def test_report_check_table_and_plot(tmp_path) -> None:
    m = bench_metrics([ANN_1, ANN_2], [ACT_1, ACT_2], ["zh", "en"])
    report = {"policies": {"model": m, "vad": m}, "n_dialogues": 2}
    assert check_report(json.loads(json.dumps(report))) == []
    bad = json.loads(json.dumps(report))
    bad["policies"]["vad"]["pause_takeover_rate"] = 1.5
    del bad["policies"]["model"]["by_language"]["zh"]["smooth_latency_ms_p90"]
    assert check_report(bad) == [
        "model.zh.smooth_latency_ms_p90: 缺少",
        "vad.pause_takeover_rate: 比率 1.5 不在 [0, 1]",
    ]
    table = markdown_table(report)
    assert "| pause_takeover_rate | 1.00 | 1.00 |" in table  # 只有 D1 的停頓
    assert "| smooth_latency_ms_p50 | 200 | 200 |" in table
    assert "model zh" in table and "vad en" in table
    png = plot_duplex_timeline(
        ANN_1,
        {"model": ACT_1, "vad": ACT_1},
        tmp_path / "t.png",
        events={"model": [(16, "SPEAKING"), (42, "YIELDED")]},
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dialogue_rows(tmp_path_factory):
    from speakllm_jax.data.demo_corpus import has_espeak
    from speakllm_jax.data.demo_data import turn_dialogue_manifest

    if not has_espeak():
        pytest.skip("需要 espeak-ng")
    path = turn_dialogue_manifest(tmp_path_factory.mktemp("fdx"), n=5)
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_turn_dialogues_schema_and_oracle(dialogue_rows) -> None:
    """錄音中的助理（標註即答案）：不在停頓接話、不理附和、搶話後 160–300 ms 停下、
    說完後 120–280 ms 回應。"""
    rows = dialogue_rows
    assert [r["language"] for r in rows] == ["zh", "en", "mixed", "zh", "en"]
    assert [r["split"] for r in rows] == ["train", "train", "train", "dev", "test"]
    voices = {r["split"]: r["speaker"].split("|")[0] for r in rows}
    assert voices["train"] != voices["dev"] and voices["dev"] != voices["test"]
    anns, acts = [], []
    for r in rows:
        assert r["duration"] < 28.0
        assert all(0.3 - 1e-3 <= p["end"] - p["start"] <= 1.0 + 1e-3 for p in r["pauses"])
        assert {p["kind"] for p in r["pauses"]} <= {"filler", "comma"}
        bcs = [t for t in r["turns"] if t["kind"] == "backchannel"]
        assert len(bcs) == 1 and 0.15 <= bcs[0]["end"] - bcs[0]["start"] <= 0.6
        ann = TurnTakingAnnotation.from_row(r)
        assert len(ann.pauses) == len(r["pauses"]) >= 1 and len(ann.barge_ins) == 1
        n = int(np.ceil(r["duration"] / 0.04))
        anns.append(ann)
        acts.append(activity_from_turns(r["turns"], "assistant", n))
    m = bench_metrics(anns, acts, [r["language"] for r in rows])
    assert m["pause_takeover_rate"] == 0.0
    assert m["backchannel_takeover_rate"] == 0.0
    assert m["interruption_yield_rate"] == 1.0
    assert 160.0 <= m["interruption_stop_ms_p50"] <= 340.0
    lat = [s["latency_ms"] for d in m["dialogues"] for s in d["smooth"] if s["takeover"]]
    assert lat and all(80.0 <= x <= 320.0 for x in lat)  # 120–280 ms，幀格取整 ±40 ms
    assert set(m["by_language"]) == {"zh", "en", "cs"}


def test_turn_dialogues_deterministic(tmp_path) -> None:
    """同一種子產出逐位元相同的對話；不同種子不同。"""
    from speakllm_jax.data.demo_corpus import has_espeak
    from speakllm_jax.data.demo_dialogues import DIALOGUE_DIR, make_turn_dialogues

    if not has_espeak():
        pytest.skip("需要 espeak-ng")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_turn_dialogues(tmp_path / name, 1, seed=seed, compact=True)

    def files(name: str) -> list[bytes]:
        d = tmp_path / name / DIALOGUE_DIR
        return [p.read_bytes() for p in sorted(d.iterdir())]

    assert files("a") == files("b")
    assert files("a") != files("c")
