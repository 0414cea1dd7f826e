"""輪替決策規則（`speakllm_jax.turn_policy`）在手寫 logits 序列上的行為：門檻、遲滯、最短說話幀數、
讓出、平滑與 `allow_start`，以及 `TurnRule` 的欄位檢查。"""

from __future__ import annotations

import math

import pytest

from speakllm_jax.labels import TurnAction
from speakllm_jax.turn_policy import TurnDecider, TurnRule, decide_all, parse_overrides, softmax

L, S, C, Y = (
    int(a) for a in (TurnAction.LISTEN, TurnAction.SPEAK, TurnAction.CONTINUE, TurnAction.YIELD)
)


def logits(**probs: float) -> list[float]:
    """由各類別機率（其餘平均分掉）組出 logits。"""
    names = [a.name.lower() for a in TurnAction]
    rest = (1.0 - sum(probs.values())) / (len(names) - len(probs))
    return [math.log(probs.get(n, rest)) for n in names]


def test_softmax_inverts_logits() -> None:
    p = softmax(logits(speak=0.25, listen=0.5))
    assert p[S] == pytest.approx(0.25) and p[L] == pytest.approx(0.5)
    assert sum(p) == pytest.approx(1.0)


def test_start_threshold_replaces_argmax() -> None:
    # SPEAK 0.35 不是 argmax（LISTEN 0.6），但說話機率 0.35 + 0.025 · 2 ≥ 0.3：開口。
    rule = TurnRule(start_threshold=0.3, min_speak_frames=1)
    frames = [logits(listen=0.9, speak=0.05), logits(listen=0.6, speak=0.35)]
    assert decide_all(frames, rule) == [L, S]


def test_min_speak_frames_and_hysteresis() -> None:
    rule = TurnRule(start_threshold=0.3, stop_threshold=0.8, min_speak_frames=3)
    start = logits(speak=0.9)
    stop = logits(listen=0.9)
    # 開口後第 2、3 幀就算停止機率夠也繼續（最短 3 幀），第 4 幀才結束。
    assert decide_all([start, stop, stop, stop, stop], rule) == [S, C, C, L, L]
    # 停止機率 0.6 + 0.1 < 0.8：說話中繼續（單看 argmax 是 LISTEN）；聆聽中說話機率 0.3 ≥ 0.3 開口。
    mid = logits(listen=0.6)
    d = TurnDecider(TurnRule(start_threshold=0.3, stop_threshold=0.8, min_speak_frames=1))
    assert [d.step(start), d.step(mid), d.step(mid)] == [S, C, C]


def test_yield_is_immediate_and_allow_start() -> None:
    rule = TurnRule(yield_threshold=0.5, min_speak_frames=25)
    d = TurnDecider(rule)
    assert d.step(logits(speak=0.9)) == S
    # 讓出不受最短說話幀數限制。
    assert d.step(logits(**{"yield": 0.6})) == Y
    assert not d.speaking
    assert d.step(logits(speak=0.9), allow_start=False) == L
    assert d.step(logits(speak=0.9)) == S
    d.stop()
    assert not d.speaking and d.step(logits(listen=0.9)) == L


def test_smoothing_averages_recent_frames() -> None:
    rule = TurnRule(start_threshold=0.6, smooth_frames=2, min_speak_frames=1)
    # 說話機率：0.15、0.95、0.95；單幀的尖峰與前一幀平均 0.55 < 0.6：不開口；連續兩幀才開口。
    frames = [logits(speak=0.05, listen=0.8), logits(speak=0.9), logits(speak=0.9)]
    assert decide_all(frames, rule) == [L, L, S]
    assert decide_all(frames, TurnRule(start_threshold=0.6, min_speak_frames=1)) == [L, S, C]


def test_rule_round_trip_and_errors() -> None:
    r = TurnRule(start_threshold=0.25, min_speak_frames=5)
    assert TurnRule.from_dict(r.to_dict()) == r
    assert TurnRule.from_dict({}) == TurnRule()
    with pytest.raises(ValueError, match="未知欄位"):
        TurnRule.from_dict({"start": 0.2})
    with pytest.raises(ValueError, match="start_threshold"):
        TurnRule.from_dict({"start_threshold": 0.0})
    with pytest.raises(ValueError, match="min_speak_frames"):
        TurnRule.from_dict({"min_speak_frames": 0})
    # 沒有遲滯（說話機率 0.35 時剛停就會再開口）：拒絕。
    with pytest.raises(ValueError, match="遲滯"):
        TurnRule(start_threshold=0.3, stop_threshold=0.6)


def test_train_cli_rejects_a_rule_without_hysteresis(tmp_path, capsys) -> None:
    """`--config.turn_rule.*` 的錯誤在訓練開始前以一行 `錯誤：…`、結束碼 2 回報。"""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    spec = importlib.util.spec_from_file_location("launch_train_rule", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from speakllm_jax.cli import run_cli

    argv = ["--config", "phase2_turns", "--workdir", str(tmp_path / "r")]
    argv += ["--config.turn_rule.stop_threshold=0.5"]
    assert run_cli(mod.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("錯誤：--config.turn_rule") and "遲滯" in err and "\n" not in err


def test_stop_smoothing_rides_over_a_dip_and_keeps_start_fast() -> None:
    rule = TurnRule(min_speak_frames=1, stop_smooth_frames=3)
    go, dip = logits(speak=0.9), logits(listen=0.95)
    # 開口不受停止平滑影響（第一幀就開口）；停止機率 0.95 只有一幀：三幀平均 (0.95 + 0.05 · 2) / 3
    # < 0.8，繼續。
    assert decide_all([go, go, dip, go, go], rule) == [S, C, C, C, C]
    # 連續三幀（這一輪累積滿三幀）才停：開口後第 2、3 幀不夠三幀，第 4 幀停。
    assert decide_all([go, dip, dip, dip, dip], rule) == [S, C, C, L, L]
    # 沒有停止平滑時，同一個下探就結束這一輪。
    assert decide_all([go, go, dip, go], TurnRule(min_speak_frames=1)) == [S, C, L, S]
    # 讓出不受停止平滑影響：仍是立即的。
    assert decide_all([go, logits(**{"yield": 0.6})], rule) == [S, Y]


def test_overlap_stop_threshold_one_keeps_the_turn_until_yield() -> None:
    rule = TurnRule(min_speak_frames=1, overlap_stop_threshold=1.0)
    go, stop = logits(speak=0.9), logits(listen=0.9)
    d = TurnDecider(rule)
    # 使用者在助理說話時出聲（附和）：停止機率高也保住這一輪；重疊結束後照常判斷停止。
    got = [d.step(go), d.step(stop, overlap=True), d.step(stop, overlap=True), d.step(go)]
    assert got == [S, C, C, C]
    assert d.step(stop) == L
    # 重疊中 yield 照樣立即讓出。
    d = TurnDecider(rule)
    assert [d.step(go), d.step(logits(**{"yield": 0.7}), overlap=True)] == [S, Y]
    # 重疊時的門檻為 0（缺省）時 overlap 不改變決策。
    d = TurnDecider(TurnRule(min_speak_frames=1))
    assert [d.step(go), d.step(stop, overlap=True)] == [S, L]


def test_overlap_thresholds() -> None:
    go = logits(speak=0.9)
    # 重疊時停止門檻 0.95：停止機率 0.9 不停、0.97 才停；重疊外照常 0.8。
    rule = TurnRule(min_speak_frames=1, overlap_stop_threshold=0.95)
    d = TurnDecider(rule)
    assert [d.step(go), d.step(logits(listen=0.9), overlap=True)] == [S, C]
    assert d.step(logits(listen=0.97), overlap=True) == L
    # 重疊時讓出門檻 0.3：p(yield) 0.35 在重疊時讓出，重疊外不讓出（0.35 + 0.1625 < 0.8，也不停）。
    rule = TurnRule(min_speak_frames=1, overlap_yield_threshold=0.3)
    y = logits(**{"yield": 0.35})
    d = TurnDecider(rule)
    assert [d.step(go), d.step(y), d.step(y, overlap=True)] == [S, C, Y]


def test_overlap_restarts_the_stop_average() -> None:
    rule = TurnRule(min_speak_frames=1, stop_smooth_frames=2, overlap_stop_threshold=1.0)
    go, stop = logits(speak=0.9), logits(listen=0.9)
    d = TurnDecider(rule)
    assert [d.step(go), d.step(stop), d.step(stop, overlap=True)] == [S, C, C]
    # 重疊之前的停止機率不算：重疊後要再累積兩幀。
    assert [d.step(stop), d.step(stop)] == [C, L]


def test_cooldown_blocks_restart_until_the_user_turn_ends() -> None:
    rule = TurnRule(min_speak_frames=1, cooldown_frames=3)
    go, stop = logits(speak=0.9), logits(listen=0.9)
    # 停止後三幀不開口，第四幀起照常。
    assert decide_all([go, stop, go, go, go, go], rule) == [S, L, L, L, L, S]
    # 讓出與外部結束也開始冷卻。
    assert decide_all([go, logits(**{"yield": 0.6}), go, go, go, go], rule) == [S, Y, L, L, L, S]
    d = TurnDecider(rule)
    d.step(go)
    d.stop()
    assert [d.step(go), d.step(go)] == [L, L]
    # 呼叫端判定使用者說完：冷卻立即結束。
    d.end_cooldown()
    assert d.step(go) == S


def test_new_fields_round_trip_and_errors() -> None:
    r = TurnRule(stop_smooth_frames=6, cooldown_frames=20, overlap_stop_threshold=0.95)
    assert TurnRule.from_dict(r.to_dict()) == r
    # 命令列的字串值轉成欄位的型別。
    got = TurnRule.from_dict({"cooldown_frames": "7", "overlap_yield_threshold": "0.3"})
    assert got.cooldown_frames == 7 and got.overlap_yield_threshold == 0.3
    assert TurnRule().stop_smooth_frames == 1 and TurnRule().cooldown_frames == 0
    with pytest.raises(ValueError, match="stop_smooth_frames"):
        TurnRule.from_dict({"stop_smooth_frames": 0})
    with pytest.raises(ValueError, match="cooldown_frames"):
        TurnRule.from_dict({"cooldown_frames": -1})
    with pytest.raises(ValueError, match="overlap_stop_threshold 必須在"):
        TurnRule.from_dict({"overlap_stop_threshold": 1.5})
    with pytest.raises(ValueError, match="overlap_yield_threshold 必須是 float"):
        TurnRule.from_dict({"overlap_yield_threshold": "high"})
    with pytest.raises(ValueError, match="cooldown_frames 必須是整數"):
        TurnRule.from_dict({"cooldown_frames": 2.5})


def test_parse_overrides() -> None:
    assert parse_overrides(["a=1,b=2", "c = x"]) == {"a": "1", "b": "2", "c": "x"}
    assert parse_overrides([""]) == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["cooldown_frames"])


def test_serving_override_merges_with_the_exported_rule() -> None:
    """服務設定 `turn_rule`（"KEY=VALUE,…"）覆寫匯出的規則；不合理的值以 INVALID_ARGUMENT 回報。"""
    from export.serving.session import SessionError, SessionSettings

    exported = TurnRule(start_threshold=0.25, stop_threshold=0.9).to_dict()
    got = SessionSettings(turn_rule="cooldown_frames=20,overlap_stop_threshold=1").rule(exported)
    assert got == TurnRule(
        start_threshold=0.25, stop_threshold=0.9, cooldown_frames=20, overlap_stop_threshold=1.0
    )
    assert SessionSettings().rule(exported) == TurnRule.from_dict(exported)
    # 與匯出的開口門檻 0.25 合起來沒有遲滯（0.25 + 0.7 ≤ 1）。
    with pytest.raises(SessionError, match="遲滯") as err:
        SessionSettings(turn_rule="stop_threshold=0.7").rule(exported)
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SessionError, match="未知欄位"):
        SessionSettings(turn_rule="cooldown=3").rule(exported)


def test_evaluate_cli_rejects_an_unknown_rule_field(tmp_path, capsys) -> None:
    """`launch/evaluate.py --duplex-server --turn_rule` 打錯欄位：匯出之前以一行 `錯誤：…`、結束碼 2。"""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("launch_evaluate_rule", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from speakllm_jax.cli import run_cli

    man = tmp_path / "m.jsonl"
    man.write_text("{}\n", "utf-8")
    argv = ["--workdir", str(tmp_path / "none"), "--duplex-server", "--manifest", str(man)]
    argv += ["--out", str(tmp_path / "out"), "--turn_rule", "cooldown=3"]
    assert run_cli(mod.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("錯誤：--turn_rule") and "cooldown_frames" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
