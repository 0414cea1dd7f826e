"""輪替配方的完整一輪：生成輪替示範對話 → 抽助理聲道語音碼 → `phase2_turns` 訓練 →
經 loopback 伺服器在 test 切分上評估（`model` 與 `vad` 同一次執行），印出與驗收目標的對照。

python benchmarks/bench_turn_recipe.py [--dialogues 150] [--steps 600] [--workdir runs/turn_recipe]
    [--ablation none|overlap_off|lead0|tone_off] [--run_name NAME] [--max_test 0] [--eval_only]
    [--reuse_data] [--policies model,vad] [--turn_rule KEY=VALUE ...] [--concurrency 30]

每一步都是使用者會打的指令（子程序），所以這也是配方的說明書。印出訓練的每步秒數、
開始與結束時的 1 分鐘負載（2 核 CPU 與他人共用時，30 分鐘能跑幾步由此外推）與評估表；
`--ablation` 只關掉一個研究模組（`research.overlap_aware=False`、`research.lead_frames=0`、
`research.tone_aware=False`），其餘相同。訓練到 `WORKDIR/run_{NAME}`、評估到 `WORKDIR/eval_{NAME}`
（`--run_name` 缺省為消融名稱；短步數的 `none` 另取名字，不蓋掉完整配方的 `run_none`）。
`--reuse_data` 沿用 WORKDIR/data 已有的對話與語音碼；`--policies model` 只評估輪替頭（消融用）；
`--turn_rule` 傳給評估（覆寫匯出的決策規則）。只印表，不做斷言。

調規則（在 dev 切分上，不經 gRPC）：`--tune "KEY=VALUE,…" --tune "…" --model_dir EXPORTED
--manifest DEV.jsonl [--max_dialogues 8]`：每段對話同時開每個規則一個 `policy=model` 會話
（與伺服器同一個 `DuplexSession`，以 `step_sessions` 一批前進，成本遠低於逐一評估），
印出每個規則的指標；空字串為匯出的規則。最後的數字仍以 `launch/evaluate.py --duplex-server` 為準。
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

import numpy as np  # noqa: E402

from speakllm_jax.audio.constants import FRAME_SAMPLES, SAMPLE_RATE  # noqa: E402

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


class _SilentDecoder:
    """`--tune` 用：語音碼視窗 `[B, Q, T]` → 全零波形 `[B, T · 640]`（只需要幀號）。"""

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return np.zeros((codes.shape[0], codes.shape[-1] * FRAME_SAMPLES), np.float32)


def _audio_seqs(msgs: list) -> list[int]:
    """訊息中助理音訊封包的幀號（`seq`）。"""
    return [int(m.audio.seq) for m in msgs if m.WhichOneof("payload") == "audio"]


def tune_rules(
    model_dir: str | Path,
    voila_dir: str | Path,
    manifest: str | Path,
    rules: list[str],
    max_dialogues: int = 8,
    tail_seconds: float = 1.0,
) -> int:
    """每段對話、每個規則一個 `policy=model` 會話一批前進；印出每個規則的指標表。"""
    # 延後匯入：只有 --tune 需要 torch 與服務端
    from export.serving.duplex_eval import dialogue_rows, user_channel
    from export.serving.session import DuplexSession, SessionSettings, load_engine, step_sessions
    from speakllm_jax.eval.duplex_bench import activity_from_frames, bench_metrics
    from speakllm_jax.eval.turn_taking import TurnTakingAnnotation

    engine = load_engine(model_dir, voila_dir)
    # 輪替決策與回饋只用語音碼，不用解出的波形：調規則時不解碼（送出靜音封包），省下大半成本。
    engine.voila = _SilentDecoder()
    rows = dialogue_rows(manifest, max_dialogues)
    tail = np.zeros(int(tail_seconds * SAMPLE_RATE), np.float32)
    waves = [np.concatenate([user_channel(r), tail]) for r in rows]
    # 所有（對話, 規則）的會話一起前進：會話越多，每個會話每幀的成本越低。
    pairs = [(d, k) for d in range(len(rows)) for k in range(len(rules))]
    sessions = [
        DuplexSession(engine, SessionSettings(policy="model", turn_rule=rules[k])) for _, k in pairs
    ]
    frames: list[list[int]] = [[] for _ in pairs]
    t0 = time.perf_counter()
    for f in range(max(len(w) for w in waves) // FRAME_SAMPLES):
        live = []
        for i, (d, _) in enumerate(pairs):
            chunk = waves[d][f * FRAME_SAMPLES : (f + 1) * FRAME_SAMPLES]
            if len(chunk) == FRAME_SAMPLES:
                frames[i] += _audio_seqs(sessions[i].feed(chunk, defer=True))
                live.append(i)
            elif len(waves[d]) // FRAME_SAMPLES == f:
                frames[i] += _audio_seqs(sessions[i].finish())
        out, errors = step_sessions([sessions[i] for i in live])
        if errors:
            raise next(iter(errors.values()))
        for i in live:
            frames[i] += _audio_seqs(out[id(sessions[i])])
        if f % 100 == 0:
            print(f"第 {f} 幀：{time.perf_counter() - t0:.0f} 秒", flush=True)
    for i, s in enumerate(sessions):
        frames[i] += _audio_seqs(s.finish())
    acts = [
        [
            activity_from_frames(frames[i], -(-len(waves[d]) // FRAME_SAMPLES))
            for i, (d, kk) in enumerate(pairs)
            if kk == k
        ]
        for k in range(len(rules))
    ]
    anns = [TurnTakingAnnotation.from_row(r) for r in rows]
    langs = [str(r.get("language", "zh")) for r in rows]
    print(f"\n{len(rows)} 段對話（{manifest}）")
    print("| rule | " + " | ".join(k for k, _, _ in TARGETS) + " | 細節 |")
    print("| --- |" + " --- |" * (len(TARGETS) + 1))
    for rule, act in zip(rules, acts, strict=True):
        m = bench_metrics(anns, act, langs)
        show = [
            ("–" if m[k] is None else f"{m[k]:.2f}" if k.endswith("_rate") else f"{m[k]:.0f}")
            for k, _, _ in TARGETS
        ]
        bcs = [b for d in m["dialogues"] for b in d["backchannels"]]
        bis = [b for d in m["dialogues"] for b in d["interruptions"] if b["applicable"]]
        why = (
            f"附和 {len(bcs)}：讓出 {sum(b['yielded'] for b in bcs)}、接話 "
            f"{sum(b['takeover'] for b in bcs)}、起點時沒在說 {sum(not b['speaking'] for b in bcs)}；"
            f"適用的搶話 {len(bis)}"
        )
        print(f"| {rule or '（匯出的規則）'} | " + " | ".join(show) + f" | {why} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dialogues", type=int, default=150)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--workdir", default="runs/turn_recipe")
    p.add_argument("--ablation", default="none", choices=sorted(ABLATIONS))
    p.add_argument("--max_test", type=int, default=0, help="只評估 test 切分的前 N 段（0：全部）")
    p.add_argument("--eval_only", action="store_true", help="沿用已訓練的 workdir")
    p.add_argument("--run_name", default="", help="執行與評估資料夾的名字（缺省：消融名稱）")
    p.add_argument("--reuse_data", action="store_true", help="沿用 WORKDIR/data 已有的資料")
    p.add_argument("--policies", default="model,vad", help="評估的策略（消融只需 model）")
    p.add_argument("--turn_rule", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--concurrency", type=int, default=30, help="評估時同時串流的會話數")
    p.add_argument("--tune", action="append", default=[], metavar="RULE", help="見說明")
    p.add_argument("--model_dir", default="", help="--tune：匯出的模型")
    p.add_argument("--manifest", default="", help="--tune：對話清單（dev 切分）")
    p.add_argument("--max_dialogues", type=int, default=8, help="--tune：前幾段對話")
    a = p.parse_args(argv)
    if a.tune:
        voila = Path(a.workdir) / "data" / "voila"
        return tune_rules(a.model_dir, voila, a.manifest, a.tune, a.max_dialogues)
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    py = sys.executable
    work = Path(a.workdir)
    data = work / "data"
    man = data / "manifests"
    codes = data / "codes_voila"
    name = a.run_name or a.ablation
    run = work / f"run_{name}"
    load0 = os.getloadavg()[0]
    train_s = 0.0
    if not a.eval_only:
        # 延後匯入：--eval_only 時不產生資料（Voila 分詞器會載入 PyTorch）
        from export.tokenizers.voila import make_demo_voila_tokenizer
        from speakllm_jax.data.demo_data import turn_dialogue_manifest

        if not (a.reuse_data and (man / "duplex_dialogue.test.norm.jsonl").exists()):
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
    out = work / f"eval_{name}"
    _run(
        [py, "launch/evaluate.py", "--workdir", str(run), "--duplex-server"]
        + ["--manifest", str(test), "--policies", ",".join(policies), "--out", str(out)]
        + ["--voila_dir", str(data / "voila"), "--concurrency", str(a.concurrency)]
        + [f"--turn_rule={r}" for r in a.turn_rule]
    )
    report = json.loads((out / "turn_taking.json").read_text("utf-8"))
    per = f"每步 {train_s / a.steps:.1f} 秒（含編譯）" if train_s else "沿用已訓練的執行"
    print(
        f"\n配方 {a.ablation}（{name}）：{a.steps} 步，訓練 {train_s / 60:.1f} 分鐘，{per}；",
        end="",
    )
    print(f"1 分鐘負載 {load0:.1f} → {os.getloadavg()[0]:.1f}（2 核）")
    print(f"決策規則：{report.get('turn_rule')}")
    log = run / "metrics.jsonl"
    if log.exists():
        last = [json.loads(x) for x in log.read_text("utf-8").splitlines() if x.strip()][-1]
        losses = {k: round(v, 3) for k, v in last.items() if k.endswith("_loss")}
        print(f"第 {last['step']} 步的訓練損失：{losses}")
    pols = report["policies"]
    print(f"test 切分 {report['n_dialogues']} 段；目標（policy=model）與其他策略：")
    print("| metric | target | " + " | ".join(pols) + " |")
    print("| --- | --- |" + " --- |" * len(pols))
    for key, op, thr in TARGETS:
        vals = [pols[p][key] for p in pols]
        fmt = "{:.2f}" if key.endswith("_rate") else "{:.0f}"
        show = [fmt.format(x) if x is not None else "–" for x in vals]
        if "model" in pols:
            m = pols["model"][key]
            if m is not None and (m >= thr if op == ">=" else m <= thr):
                show[list(pols).index("model")] += " ✓"
        print(f"| {key} | {op} {thr:g} | " + " | ".join(show) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
