"""輪替配方的完整一輪：生成輪替示範對話 → 抽助理聲道語音碼 → `phase2_turns` 訓練 →
經 loopback 伺服器在 test 切分上評估（`model` 與 `vad` 同一次執行），印出與驗收目標的對照。

python benchmarks/bench_turn_recipe.py [--dialogues 150] [--steps 600] [--workdir runs/turn_recipe]
    [--ablation none|overlap_off|lead0|tone_off] [--max_test 0] [--eval_only]

每一步都是使用者會打的指令（子程序），所以這也是配方的說明書。印出訓練的每步秒數、
開始與結束時的 1 分鐘負載（2 核 CPU 與他人共用時，30 分鐘能跑幾步由此外推）與評估表；
`--ablation` 只關掉一個研究模組（`research.overlap_aware=False`、`research.lead_frames=0`、
`research.tone_aware=False`），其餘相同。只印表，不做斷言。
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ABLATIONS = {
    "none": [],
    "overlap_off": ["--config.research.overlap_aware=False"],
    "lead0": ["--config.research.lead_frames=0"],
    "tone_off": ["--config.research.tone_aware=False"],
}
# issue 14 的驗收目標：(鍵, 比較, 門檻)。
TARGETS = (
    ("smooth_takeover_rate", ">=", 0.9),
    ("smooth_latency_ms_p50", "<=", 240.0),
    ("pause_takeover_rate", "<=", 0.2),
    ("backchannel_takeover_rate", "<=", 0.1),
    ("interruption_yield_rate", ">=", 0.95),
    ("interruption_stop_ms_p50", "<=", 160.0),
)


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dialogues", type=int, default=150)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--workdir", default="runs/turn_recipe")
    p.add_argument("--ablation", default="none", choices=sorted(ABLATIONS))
    p.add_argument("--max_test", type=int, default=0, help="只評估 test 切分的前 N 段（0：全部）")
    p.add_argument("--eval_only", action="store_true", help="沿用已訓練的 workdir")
    a = p.parse_args(argv)
    py = sys.executable
    work = Path(a.workdir)
    data = work / "data"
    man = data / "manifests"
    codes = data / "codes_voila"
    run = work / f"run_{a.ablation}"
    load0 = os.getloadavg()[0]
    train_s = 0.0
    if not a.eval_only:
        # 延後匯入：--eval_only 時不產生資料（Voila 分詞器會載入 PyTorch）
        from export.tokenizers.voila import make_demo_voila_tokenizer
        from speakllm_jax.data.demo_data import turn_dialogue_manifest

        for split in (None, "train", "dev", "test"):
            turn_dialogue_manifest(data, n=a.dialogues, seed=0, split=split)
        voila = make_demo_voila_tokenizer(data / "voila", seed=0)
        _run(
            [py, "data/extract_speech_tokens.py", "--tokenizer", "voila", "--channel", "1"]
            + ["--manifest", str(man / "duplex_dialogue.norm.jsonl"), "--output", str(codes)]
            + ["--checkpoint", str(voila), "--no_progress"]
        )
        t0 = time.perf_counter()
        _run(
            [py, "launch/train.py", "--config", "phase2_turns", "--workdir", str(run)]
            + [f"--config.train.steps={a.steps}", "--no_progress"]
            + [f"--config.data.train_manifests={man / 'duplex_dialogue.train.norm.jsonl'}"]
            + [f"--config.data.codes_dirs={codes}", "--config.logging.plot=False"]
            + ABLATIONS[a.ablation]
        )
        train_s = time.perf_counter() - t0
    test = man / "duplex_dialogue.test.norm.jsonl"
    if a.max_test:
        lines = test.read_text("utf-8").splitlines()[: a.max_test]
        test = work / f"test_{a.max_test}.jsonl"
        test.write_text("\n".join(lines) + "\n", "utf-8")
    out = work / f"eval_{a.ablation}"
    _run(
        [py, "launch/evaluate.py", "--workdir", str(run), "--duplex-server"]
        + ["--manifest", str(test), "--policies", "model,vad", "--out", str(out)]
        + ["--voila_dir", str(data / "voila")]
    )
    report = json.loads((out / "turn_taking.json").read_text("utf-8"))
    per = f"每步 {train_s / a.steps:.1f} 秒（含編譯）" if train_s else "沿用已訓練的執行"
    print(f"\n配方 {a.ablation}：{a.steps} 步，訓練 {train_s / 60:.1f} 分鐘，{per}；", end="")
    print(f"1 分鐘負載 {load0:.1f} → {os.getloadavg()[0]:.1f}（2 核）")
    print(f"test 切分 {report['n_dialogues']} 段；目標（policy=model）與 vad 基線：")
    print("| metric | target | model | vad |\n| --- | --- | --- | --- |")
    for key, op, thr in TARGETS:
        m, v = report["policies"]["model"][key], report["policies"]["vad"][key]
        ok = m is not None and (m >= thr if op == ">=" else m <= thr)
        fmt = "{:.2f}" if key.endswith("_rate") else "{:.0f}"
        show = [fmt.format(x) if x is not None else "–" for x in (m, v)]
        print(f"| {key} | {op} {thr:g} | {show[0]}{' ✓' if ok else ''} | {show[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
