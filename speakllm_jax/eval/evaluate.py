"""評估一次訓練的結果：ASR 錯誤率（CER／WER／MER／PIER）、聲調正確率、全雙工輪替指標，
寫出 JSON 報表與圖（錯誤率長條圖、每段對話的時間軸）。

`launch/evaluate.py --workdir RUN [--step N]` 的全部邏輯。模型由執行資料夾的 `config.json` 重建，
參數由 Orbax 檢查點恢復（形狀不符的參數會報錯）。沒有指定評估清單時使用示範語料的 test 切分
與示範對話。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speakllm_jax.labels import EMOTIONS, SPEAKING_ACTIONS
from speakllm_jax.training.runs import load_run


def _asr_rows(cfg: Any) -> list[dict[str, Any]]:
    from speakllm_jax.data.manifest import read_manifest

    if cfg.data.eval_manifests:
        rows: list[dict] = []
        for m in str(cfg.data.eval_manifests).split(","):
            rows += [dict(r, _manifest=m) for r in read_manifest(m)]
        return rows
    from speakllm_jax.data.demo_data import demo_manifest

    corpora = tuple(s for s in str(cfg.data.demo_corpora).split(",") if s)
    m = demo_manifest(corpora, cfg.data.demo_dir or None, split="test", seed=int(cfg.seed))
    return [dict(r, _manifest=str(m)) for r in read_manifest(m)]


def evaluate_asr(cfg: Any, task: Any, model: Any, max_utts: int = 32) -> dict[str, Any]:
    """逐句貪婪解碼並計算錯誤率；壞音訊略過並計數。"""
    from speakllm_jax.audio.features import log_mel_np
    from speakllm_jax.audio.io import AudioError, load_audio
    from speakllm_jax.data.manifest import resolve_audio
    from speakllm_jax.eval.asr import transcribe
    from speakllm_jax.eval.error_rates import corpus_counts
    from speakllm_jax.eval.tone_accuracy import tone_accuracy_text

    rows = _asr_rows(cfg)[:max_utts]
    refs, hyps, items, skipped = [], [], [], {}
    for row in tqdm(rows, desc="ASR", disable=len(rows) < 4):
        try:
            wave = load_audio(
                resolve_audio(row, Path(row["_manifest"]).parent),
                target_sr=16000,
                offset=float(row.get("offset") or 0.0),
                duration=row.get("duration"),
            )
        except AudioError as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            continue
        mel = log_mel_np(wave, n_mels=int(cfg.data.n_mels), pad_to_seconds=None)
        mel = mel[:, : mel.shape[1] - mel.shape[1] % 4]
        hyp = transcribe(model, task.tokenizer, mel[None], int(cfg.data.max_text_tokens))[0]
        refs.append(str(row["text"]))
        hyps.append(hyp)
        items.append(
            {"id": row["id"], "ref": row["text"], "hyp": hyp, "language": row.get("language")}
        )
    if not refs:
        return {"utterances": 0, "skipped": skipped}

    def rate(langs: tuple[str, ...]) -> float | None:
        pairs = [(r, h) for r, h, it in zip(refs, hyps, items) if it["language"] in langs]
        return corpus_counts(*zip(*pairs)).rate if pairs else None

    counts = corpus_counts(refs, hyps)
    zh = [(r, h) for r, h, it in zip(refs, hyps, items) if it["language"] in ("zh", "mixed")]
    tones = tone_accuracy_text([r for r, _ in zh], [h for _, h in zh]) if zh else None
    return {
        "utterances": len(refs),
        "skipped": skipped,
        "mer": counts.rate,
        "cer": rate(("zh",)),
        "wer": rate(("en",)),
        "pier": counts.pier if counts.poi_units else None,
        "tone_accuracy": None if tones is None else tones.get("accuracy"),
        "items": items,
    }


def evaluate_duplex(cfg: Any, task: Any, model: Any, out_dir: Path, max_dialogues: int = 4) -> dict:
    """在對話上自由執行串流推論，計算輪替指標並畫時間軸。"""
    from speakllm_jax.audio.features import log_mel_np
    from speakllm_jax.data.duplex import build_duplex_example
    from speakllm_jax.data.manifest import read_manifest
    from speakllm_jax.eval.turn_taking import (
        TurnTakingAnnotation,
        plot_timeline,
        turn_taking_metrics,
    )
    from speakllm_jax.models.streaming import run_streaming
    from speakllm_jax.training.duplex_task import ensure_demo_duplex

    paths = ensure_demo_duplex(cfg.data.demo_dir or None, task.speech_tokens)
    rows = read_manifest(paths["dialogue"])[:max_dialogues]
    anns, acts, plots = [], [], []
    emo_true: list[str] = []
    emo_pred: list[str] = []
    for row in rows:
        ex = build_duplex_example(row, task.tokenizer, pad_id=task.pad_id)
        mel = log_mel_np(ex.user_audio, n_mels=int(cfg.data.n_mels), pad_to_seconds=None)
        n = min(ex.num_frames, mel.shape[1] // 4)
        out = run_streaming(model, mel[None, :, : 4 * n], n, chunk_frames=25, pad_id=task.pad_id)
        speaking = np.isin(out.turn[0], SPEAKING_ACTIONS)
        ann = TurnTakingAnnotation.from_row(row)
        anns.append(ann)
        acts.append(speaking)
        plots.append(str(plot_timeline(ann, speaking, out_dir / f"timeline_{row['id']}.png")))
        if getattr(model, "emotion_head", None) is not None and row.get("emotion"):
            emo_true.append(str(row["emotion"]))
            emo_pred.append(predict_emotion(model, mel[None, :, : 4 * n], n))
    metrics = turn_taking_metrics(anns, acts)
    report = {"dialogues": len(rows), "metrics": metrics, "timelines": plots}
    if emo_true:
        from speakllm_jax.eval.emotion import emotion_report, plot_confusion

        report["emotion"] = emotion_report(emo_true, emo_pred, EMOTIONS)
        plots.append(str(plot_confusion(report["emotion"], out_dir / "emotion_confusion.png")))
    return report


def predict_emotion(model: Any, mel: Any, num_frames: int) -> str:
    """整段使用者聲道梅爾 `[1, n_mels, 4N]` → 情緒頭預測的標籤（與訓練時的前向相同）。"""
    import jax.numpy as jnp

    user, mask = model.encode_audio(jnp.asarray(mel))
    logits = model.emotion_logits(user[:, :num_frames], mask[:, :num_frames])
    return EMOTIONS[int(np.argmax(np.asarray(logits)[0]))]


def _plot_error_rates(asr: dict[str, Any], path: Path) -> Path | None:
    names = [k for k in ("cer", "wer", "mer", "pier") if asr.get(k) is not None]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=120)
    ax.bar([n.upper() for n in names], [asr[n] for n in names], color="#4C72B0")
    ax.set_ylabel("error rate")
    ax.set_title(f"ASR ({asr['utterances']} utts)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_run(
    workdir: str | Path, step: int | None = None, max_utts: int = 32, max_dialogues: int = 4
) -> dict[str, Any]:
    """評估並寫出 `<workdir>/eval/step_<N>/report.json` 與圖；回傳報表。"""
    cfg, task, model, step = load_run(workdir, step)
    out_dir = Path(workdir) / "eval" / f"step_{step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"workdir": str(workdir), "step": step, "phase": cfg.phase}
    if cfg.task == "asr_connector":
        report["asr"] = evaluate_asr(cfg, task, model, max_utts)
        plot = _plot_error_rates(report["asr"], out_dir / "error_rates.png")
        report["plots"] = [str(plot)] if plot else []
    else:
        report["duplex"] = evaluate_duplex(cfg, task, model, out_dir, max_dialogues)
        report["plots"] = report["duplex"]["timelines"]
    (out_dir / "report.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2, default=float) + "\n", encoding="utf-8"
    )
    return report
