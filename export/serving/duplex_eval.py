"""Full-Duplex-Bench 式評估：經由真正的 gRPC 伺服器（本機 loopback）串流對話的使用者聲道，
從客戶端收到的東西計算輪替指標，每個策略（`model`、`vad`）在同一次執行中並列。

流程：載入匯出的模型資料夾與語音解碼器 → 在 127.0.0.1 的隨機埠啟動 `DuplexServer` → 每段對話、
每個策略開一條串流（`SessionOptions.policy`），送使用者聲道（16 kHz，40 ms 片段）與 `tail_seconds`
的靜音 → 記下收到的助理音訊封包（`seq` 即使用者時間軸上的幀號）與事件 →
`speakllm_jax.eval.duplex_bench.bench_metrics`。

時鐘：預設為加速時鐘——客戶端以伺服器接受的速度盡快送出，伺服器的策略只看幀號（VAD 與輪替頭
都以 40 ms 幀計，不看牆鐘），時間一律取幀號 × 40 ms，所以結果與即時串流相同且可重現。唯一與牆鐘
有關的是伺服器在 `YIELDED` 時丟掉尚未送出的音訊；伺服器每幀的計算都在背景執行緒裡等待，送出佇列
在幀與幀之間就會清空。`realtime=True` 則依音訊時間送（慢，供對照）。`concurrency` > 1 時同時開
多條串流，伺服器的批次排程把它們一批前進（每個會話的結果與單獨執行相同，
`tests/test_serving_batch.py`），共用 CPU 上快數倍；只有上述送出佇列的清空可能因此不同。

輸出（`out_dir`）：
    turn_taking.json            {"policies": {策略: 指標}, "n_dialogues": N, "clock": ..., "turn_rule": {...}}
    turn_taking.md              各策略並列的表格（總表與依語言）
    turn_taking_dialogues.json  每段對話、每個策略收到的音訊幀、事件與逐事件結果
    timeline_{id}.png           前 `plots` 段對話的時間軸（使用者／各策略的助理音訊、事件、圖例）

這個模組屬於服務端（PyTorch），不匯入 JAX。
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from configs.serving import get_config
from export.cosyvoice2.token2wav import TOKEN2WAV_CONFIG, save_random_token2wav
from export.serving import duplex_pb2 as pb
from export.serving.client import FRAME_SECONDS, SAMPLE_RATE, stream_audio
from export.serving.server import ServerThread
from export.serving.session import POLICIES, SessionError, SessionSettings, load_engine
from export.tokenizers.voila import make_demo_voila_tokenizer
from speakllm_jax.audio.io import load_audio
from speakllm_jax.data.manifest import read_manifest, resolve_audio
from speakllm_jax.eval.duplex_bench import (
    BenchConfig,
    activity_from_frames,
    bench_metrics,
    check_report,
    markdown_table,
    plot_duplex_timeline,
)
from speakllm_jax.eval.turn_taking import TurnTakingAnnotation
from speakllm_jax.turn_policy import TurnRule

EVENT_NAMES = {v: k for k, v in pb.Event.Kind.items()}


def parse_policies(text: str) -> list[str]:
    """ "model,vad" → ["model", "vad"]；未知或重複的策略拋出 ValueError。"""
    out = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = [p for p in out if p not in POLICIES]
    if not out or bad or len(set(out)) != len(out):
        raise ValueError(f"--policies={text!r}：必須是 {', '.join(POLICIES)} 中不重複的一個或多個")
    return out


def exported_rule(model_dir: str | Path, overrides: str = "") -> TurnRule:
    """`policy=model` 實際用的決策規則：匯出資料夾 `heads_config.json` 的 `turn_rule` 加上服務設定
    `turn_rule` 的覆寫（"KEY=VALUE,…"）；不合理時拋出 ValueError。"""
    heads = json.loads((Path(model_dir) / "heads_config.json").read_text("utf-8"))
    try:
        return SessionSettings(turn_rule=overrides).rule(heads.get("turn_rule") or {})
    except SessionError as err:
        raise ValueError(err.detail) from None


def dialogue_rows(manifest: str | Path, max_dialogues: int | None = None) -> list[dict[str, Any]]:
    """讀清單中的雙聲道對話列（有 `turns`、`channels` = 2）；音訊路徑解析成絕對路徑。"""
    path = Path(manifest)
    rows = []
    for row in read_manifest(path):
        if not row.get("turns") or int(row.get("channels", 1)) != 2:
            continue
        rows.append(dict(row, audio=str(resolve_audio(row, path.parent))))
        if max_dialogues and len(rows) >= max_dialogues:
            break
    if not rows:
        raise ValueError(f"{path}: 沒有雙聲道對話列（需要 turns 與 channels=2）")
    return rows


def user_channel(row: dict[str, Any]) -> np.ndarray:
    """對話列的使用者聲道（`channel_roles` 中的 "user"），16 kHz float32。"""
    roles = list(row.get("channel_roles") or ["user", "assistant"])
    if "user" not in roles:
        raise ValueError(f"{row.get('id')}: channel_roles={roles} 沒有 user")
    wave = load_audio(
        row["audio"],
        SAMPLE_RATE,
        offset=float(row.get("offset", 0.0)),
        duration=row.get("duration"),
        mono=False,
    )
    return np.ascontiguousarray(wave[roles.index("user")], np.float32)  # [聲道, 樣本]


def _record(res: Any) -> dict[str, Any]:
    return {
        "status": res.status.name,
        "detail": res.detail,
        "audio_frames": sorted(int(a.seq) for a in res.of("audio")),
        "events": [
            (int(e.frame), EVENT_NAMES.get(e.kind, str(e.kind)))
            for e in res.events()
            if e.kind in (pb.Event.SPEAKING, pb.Event.YIELDED, pb.Event.BACKCHANNEL)
        ],
    }


def run_duplex_eval(
    target: str,
    rows: Sequence[dict[str, Any]],
    policies: Sequence[str],
    out_dir: str | Path,
    tail_seconds: float = 1.0,
    realtime: bool = False,
    plots: int = 3,
    config: BenchConfig | None = None,
    meta: dict[str, Any] | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """對已啟動的伺服器（`target`）跑評估並寫出報表；回傳 `turn_taking.json` 的內容
    （`meta` 併入報表，例如 `turn_rule`）。`concurrency` > 1 時同時開這麼多條串流（批次排程一批
    前進；策略只看幀號，結果與逐一串流相同，見模組說明）。"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anns = [TurnTakingAnnotation.from_row(r) for r in rows]
    langs = [str(r.get("language", "zh")) for r in rows]
    waves = [user_channel(row) for row in rows]
    nframes = [int(np.ceil((len(w) / SAMPLE_RATE + tail_seconds) / FRAME_SECONDS)) for w in waves]
    jobs = [(i, p) for i in range(len(rows)) for p in policies]

    def one(job: tuple[int, str]) -> dict[str, Any]:
        i, p = job
        res = stream_audio(
            target,
            waves[i],
            SAMPLE_RATE,
            fast=not realtime,
            tail_seconds=tail_seconds,
            policy=p,
            timeout=None if concurrency > 1 else 120.0,
        )
        if res.status != grpc.StatusCode.OK:
            raise RuntimeError(
                f"{rows[i]['id']}（policy={p}）：串流失敗 {res.status.name} {res.detail}"
            )
        return _record(res)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        records = list(pool.map(one, jobs))
    received: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for (_, p), rec in zip(jobs, records, strict=True):
        received[p].append(rec)
    acts = {
        p: [activity_from_frames(r["audio_frames"], n) for r, n in zip(received[p], nframes)]
        for p in policies
    }
    metrics = {p: bench_metrics(anns, acts[p], langs, config) for p in policies}
    report = {
        "policies": {
            p: {k: v for k, v in m.items() if k != "dialogues"} for p, m in metrics.items()
        },
        "n_dialogues": len(rows),
        "clock": "realtime" if realtime else "accelerated (frame index × 40 ms)",
        "tail_seconds": tail_seconds,
        "languages": sorted({g for m in metrics.values() for g in m["by_language"]}),
        **(meta or {}),
    }
    probs = check_report(report)
    if probs:
        raise RuntimeError("turn_taking.json 不合格：" + "；".join(probs))
    details = [
        {
            "id": row["id"],
            "language": lang,
            "num_frames": n,
            **{p: dict(received[p][i], results=metrics[p]["dialogues"][i]) for p in policies},
        }
        for i, (row, lang, n) in enumerate(zip(rows, langs, nframes))
    ]
    (out / "turn_taking.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", "utf-8"
    )
    (out / "turn_taking_dialogues.json").write_text(
        json.dumps(details, ensure_ascii=False, indent=1) + "\n", "utf-8"
    )
    (out / "turn_taking.md").write_text(markdown_table(report), "utf-8")
    for i in range(min(plots, len(rows))):
        plot_duplex_timeline(
            anns[i],
            {p: acts[p][i] for p in policies},
            out / f"timeline_{rows[i]['id']}.png",
            events={p: received[p][i]["events"] for p in policies},
            title=f"{rows[i]['id']} ({langs[i]})",
        )
    return report


def evaluate_duplex_server(
    model_dir: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    policies: Sequence[str] = ("model", "vad"),
    voila_dir: str | Path = "",
    token2wav_dir: str | Path = "",
    max_dialogues: int | None = None,
    tail_seconds: float = 1.0,
    realtime: bool = False,
    plots: int = 3,
    overrides: dict[str, Any] | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """在 loopback 啟動伺服器（匯出的 `model_dir` 與語音解碼器），跑 `run_duplex_eval` 後關閉。

    `overrides` 覆寫服務設定（`configs/serving.py` 的欄位）；`concurrency` 見 `run_duplex_eval`。`max_session_seconds` > 0 時，使用者
    聲道加上 `tail_seconds` 超過它的對話會被伺服器拒絕，因此事先拋出 ValueError。
    """
    rows = dialogue_rows(manifest, max_dialogues)
    cfg = get_config()
    cfg.model_dir, cfg.voila_dir, cfg.token2wav_dir = (
        str(model_dir),
        str(voila_dir),
        str(token2wav_dir),
    )
    cfg.port = 0
    # 加速時鐘：幀語義由幀號決定，伺服器不必依即時到期時間節流。
    cfg.pace_realtime = bool(realtime)
    for k, v in (overrides or {}).items():
        cfg[k] = v
    if concurrency > int(cfg.max_sessions):
        raise ValueError(f"--concurrency {concurrency} 超過 max_sessions={cfg.max_sessions}")
    limit = float(cfg.max_session_seconds)  # 0 為不限
    long = [r["id"] for r in rows if 0 < limit < float(r["duration"]) + tail_seconds]
    if long:
        raise ValueError(
            f"對話長於 max_session_seconds={limit} 秒（含 {tail_seconds} 秒尾端）：{long}"
        )
    engine = load_engine(
        cfg.model_dir,
        cfg.voila_dir,
        cfg.device,
        cfg.dtype,
        cfg.attn_implementation,
        token2wav_dir=cfg.token2wav_dir,
    )
    rule = exported_rule(cfg.model_dir, cfg.turn_rule)
    meta = {"turn_rule": rule.to_dict()}
    with ServerThread(cfg, engine) as st:
        return run_duplex_eval(
            st.target,
            rows,
            policies,
            out_dir,
            tail_seconds,
            realtime,
            plots,
            meta=meta,
            concurrency=concurrency,
        )


def demo_decoder_dir(model_dir: str | Path, out_dir: str | Path) -> dict[str, str]:
    """匯出模型沒有指定語音解碼器時的示範解碼器：voila 頭用示範 Voila-Tokenizer（與示範訓練
    抽碼用的相同），cosyvoice2 頭用隨機 tiny token2wav。回傳 `voila_dir` 或 `token2wav_dir`。"""
    head = json.loads((Path(model_dir) / "heads_config.json").read_text("utf-8"))["speech_head"]
    if head == "cosyvoice2":
        d = Path(out_dir) / "token2wav"
        if not (d / TOKEN2WAV_CONFIG).exists():
            save_random_token2wav(d, seed=0)
        return {"token2wav_dir": str(d)}
    return {"voila_dir": str(make_demo_voila_tokenizer(Path(out_dir) / "voila", seed=0))}
