"""`launch/evaluate.py --duplex-server` 端到端：示範模型（與服務測試共用的資產）在 loopback 伺服器上，
兩段精簡輪替示範對話（en、語碼轉換），`model` 與 `vad` 兩個策略並列。"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from export.serving.duplex_eval import parse_policies
from speakllm_jax.data.demo_corpus import has_espeak
from speakllm_jax.data.demo_data import turn_dialogue_manifest
from speakllm_jax.eval.duplex_bench import METRIC_KEYS, check_report

_spec = importlib.util.spec_from_file_location(
    "launch_evaluate", Path(__file__).resolve().parents[1] / "launch" / "evaluate.py"
)
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
evaluate_main = _cli.main


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not has_espeak():
        pytest.skip("需要 espeak-ng")
    d = tmp_path_factory.mktemp("fdx_eval")
    rows = [
        json.loads(line)
        for line in turn_dialogue_manifest(d, n=3, compact=True).read_text("utf-8").splitlines()
    ]
    # 最短的兩段：en 與語碼轉換（中文的 espeak 語速較慢）。
    rows = [r for r in rows if r["language"] != "zh"]
    out = d / "two.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return out


def test_duplex_server_end_to_end(assets, manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fdx"
    args = ["--workdir", str(tmp_path / "unused_run"), "--duplex-server", "--manifest"]
    args += [str(manifest), "--policies", "model,vad", "--out", str(out)]
    args += ["--model_dir", str(assets[0]), "--voila_dir", str(assets[1])]
    assert evaluate_main(args) == 0
    assert "| pause_takeover_rate |" in capsys.readouterr().out
    report = json.loads((out / "turn_taking.json").read_text("utf-8"))
    assert check_report(report) == []
    assert report["n_dialogues"] == 2
    assert set(report["policies"]) == {"model", "vad"}
    for m in report["policies"].values():
        assert all(k in m for k in METRIC_KEYS)
        assert set(m["by_language"]) == {"en", "cs"}
        # 精簡對話各有一個停頓、一個附和、一次搶話，輪次結束是第一輪與搶話那一句。
        assert m["events"]["pauses"] == 2
        assert m["events"]["backchannels"] == 2
        assert m["events"]["interruptions"] == 2
        assert m["events"]["turn_ends"] == 4
    vad = report["policies"]["vad"]
    # VAD 基線在使用者靜音 end_silence_ms（320 ms）後開口，最多 3 秒：至少接住一個輪次結束。
    assert vad["smooth_takeover_rate"] > 0
    # 接話起點 = 最後一個語音幀 + 320 ms；VAD 的能量下限（峰值減 30 dB）把標註結尾的弱尾音算成
    # 靜音，最後一個語音幀可早於標註的結尾至多約兩幀，所以下限是 320 − 80 ms。
    assert vad["smooth_latency_ms_p50"] >= 320.0 - 80.0
    details = json.loads((out / "turn_taking_dialogues.json").read_text("utf-8"))
    assert [d["language"] for d in details] == ["en", "mixed"]
    for d in details:
        assert d["vad"]["status"] == "OK" and d["vad"]["audio_frames"]
        assert max(d["vad"]["audio_frames"]) < d["num_frames"]
    pngs = sorted(p.name for p in out.glob("timeline_*.png"))
    assert len(pngs) == 2
    assert (out / pngs[0]).read_bytes()[:4] == b"\x89PNG"
    assert "| metric | model | vad |" in (out / "turn_taking.md").read_text("utf-8")


def test_bad_policies_and_missing_manifest(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError):
        parse_policies("model,foo")
    base = ["--workdir", str(tmp_path), "--duplex-server", "--out", str(tmp_path / "o")]
    assert evaluate_main(base + ["--manifest", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("錯誤：--manifest") and "\n" not in err
    (tmp_path / "m.jsonl").write_text("", "utf-8")
    assert evaluate_main(base + ["--manifest", str(tmp_path / "m.jsonl"), "--policies", "x"]) == 2
    assert capsys.readouterr().err.startswith("錯誤：--policies")
    # 清單裡沒有雙聲道對話列：在載入模型之前就以一行錯誤結束。
    dirs = ["--model_dir", str(tmp_path), "--voila_dir", str(tmp_path)]
    assert evaluate_main(base + ["--manifest", str(tmp_path / "m.jsonl")] + dirs) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("錯誤：") and "沒有雙聲道對話列" in err and "\n" not in err
    # 有對話列，但 --model_dir 不是匯出的模型資料夾：一行錯誤，不讀檔失敗。
    row = {"id": "d0", "audio": "d0.wav", "channels": 2}
    row["turns"] = [{"speaker": "user", "start": 0.0, "end": 1.0, "text": "你好"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", "utf-8")
    assert evaluate_main(base + ["--manifest", str(tmp_path / "d.jsonl")] + dirs) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("錯誤：--model_dir") and "heads_config.json" in err and "\n" not in err
