"""評估一次訓練的結果：ASR 錯誤率（CER／WER／MER／PIER）、聲調正確率、全雙工輪替指標，
寫出 JSON 報表與圖（錯誤率長條圖、每段對話的時間軸）。

`launch/evaluate.py --workdir RUN [--step N]` 的全部邏輯。模型由執行資料夾的 `config.json` 重建，
參數由 Orbax 檢查點恢復（形狀不符的參數會報錯）。評估資料取 `data.eval_manifests`（ASR 為語句清單、
全雙工為對話清單，逗號分隔）；沒有指定時 ASR 用示範語料的 test 切分、全雙工用示範對話。

任意長度的對話：全雙工評估以 `models.streaming.run_streaming` 逐幀自由執行，使用者聲道切成
不超過 Whisper 編碼器上限（30 秒）的連續編碼窗，各窗獨立編碼後串接幀特徵，LLM 的 KV 快取
跨窗連續（見 `models/streaming.py`）；情緒預測同樣逐窗編碼後在整段有效幀上平均。
聲調頭另以訓練的教師強制前向計分（`tone_head_accuracy`，目標一律聲調感知）。
ASR 的單句超過編碼器上限時略過（`too_long`）。無法評估的語句／對話略過、依原因計數並列出 id；
`report.json` 一定寫出（評估途中出錯時也寫出已有的部分與 `error`，再把錯誤往上拋）。
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.features import log_mel_np
from speakllm_jax.audio.io import AudioError, SkipCounter, load_audio
from speakllm_jax.data.demo_data import demo_manifest
from speakllm_jax.data.duplex import (
    DUPLEX_BATCH,
    DUPLEX_EXAMPLE_OPS,
    DUPLEX_TRAIN_OPS,
    DuplexContext,
)
from speakllm_jax.data.manifest import read_manifest, resolve_audio
from speakllm_jax.data.ops import RowOps, apply_ops, compose
from speakllm_jax.data.speech_tokens import load_codes
from speakllm_jax.eval.asr import transcribe
from speakllm_jax.eval.emotion import emotion_report, plot_confusion
from speakllm_jax.eval.error_rates import corpus_counts
from speakllm_jax.eval.tone_accuracy import tone_accuracy_text, tone_head_summary
from speakllm_jax.eval.turn_taking import (
    TurnTakingAnnotation,
    plot_timeline,
    turn_taking_metrics,
)
from speakllm_jax.labels import EMOTIONS, SPEAKING_ACTIONS
from speakllm_jax.models.streaming import encode_user_stream, run_streaming
from speakllm_jax.training.runs import load_run
from speakllm_jax.training.tasks.duplex import duplex_config, ensure_demo_duplex
from speakllm_jax.turn_policy import TurnRule


def _asr_rows(cfg: Any) -> list[dict[str, Any]]:
    if cfg.data.eval_manifests:
        rows: list[dict] = []
        for m in str(cfg.data.eval_manifests).split(","):
            rows += [dict(r, _manifest=m) for r in read_manifest(m)]
        return rows
    corpora = tuple(s for s in str(cfg.data.demo_corpora).split(",") if s)
    m = demo_manifest(corpora, cfg.data.demo_dir or None, split="test", seed=int(cfg.seed))
    return [dict(r, _manifest=str(m)) for r in read_manifest(m)]


def evaluate_asr(cfg: Any, task: Any, model: Any, max_utts: int = 32) -> dict[str, Any]:
    """逐句貪婪解碼並計算錯誤率；壞音訊略過並計數。"""
    rows = _asr_rows(cfg)[:max_utts]
    refs, hyps, items = [], [], []
    skips = SkipCounter()
    max_mel = 2 * model.encoder.config.max_source_positions
    for row in tqdm(rows, desc="ASR", disable=len(rows) < 4):
        try:
            wave = load_audio(
                resolve_audio(row, Path(row["_manifest"]).parent),
                target_sr=SAMPLE_RATE,
                offset=float(row.get("offset") or 0.0),
                duration=row.get("duration"),
            )
        except AudioError as err:
            _skip(skips, row, err.reason, str(err))
            continue
        mel = log_mel_np(wave, n_mels=int(cfg.data.n_mels), pad_to_seconds=None)
        mel = mel[:, : mel.shape[1] - mel.shape[1] % 4]
        if mel.shape[1] > max_mel:
            detail = f"{mel.shape[1] / 100:.1f} 秒，超過編碼器上限 {max_mel / 100:.0f} 秒"
            _skip(skips, row, "too_long", detail)
            continue
        hyp = transcribe(model, task.tokenizer, mel[None], int(cfg.data.max_text_tokens))[0]
        refs.append(str(row["text"]))
        hyps.append(hyp)
        items.append(
            {"id": row["id"], "ref": row["text"], "hyp": hyp, "language": row.get("language")}
        )
    if not refs:
        return {"utterances": 0, **_skip_fields(skips)}

    def rate(langs: tuple[str, ...]) -> float | None:
        pairs = [(r, h) for r, h, it in zip(refs, hyps, items) if it["language"] in langs]
        return corpus_counts(*zip(*pairs)).rate if pairs else None

    counts = corpus_counts(refs, hyps)
    zh = [(r, h) for r, h, it in zip(refs, hyps, items) if it["language"] in ("zh", "mixed")]
    tones = tone_accuracy_text([r for r, _ in zh], [h for _, h in zh]) if zh else None
    return {
        "utterances": len(refs),
        **_skip_fields(skips),
        "mer": counts.rate,
        "cer": rate(("zh",)),
        "wer": rate(("en",)),
        "pier": counts.pier if counts.poi_units else None,
        "tone_accuracy": None if tones is None else tones.get("accuracy"),
        "items": items,
    }


def _skip(skips: SkipCounter, row: dict, reason: str, detail: str) -> None:
    """略過一列：記入 `skips`（原因與 id），並在 stderr 印一行。"""
    rid = str(row.get("id", "?"))
    skips.add(rid, reason, detail)
    print(f"略過 {rid}（{reason}）：{detail}", file=sys.stderr)


def _skip_fields(skips: SkipCounter) -> dict[str, Any]:
    """報表的 `skipped`（{原因: 數量}）與 `skipped_items`（[{id, reason, detail}]）。"""
    items = [{"id": k, "reason": r, "detail": d} for k, r, d in skips.items]
    return {"skipped": skips.as_dict(), "skipped_items": items}


def _dialogue_rows(cfg: Any, task: Any) -> list[dict[str, Any]]:
    """全雙工評估的對話列：`data.eval_manifests`（音訊相對路徑相對於清單檔）或示範對話。"""
    if cfg.data.eval_manifests:
        rows: list[dict] = []
        for m in (x for x in str(cfg.data.eval_manifests).split(",") if x):
            base = Path(m).resolve().parent
            for r in read_manifest(m):
                if isinstance(r.get("audio"), str) and r["audio"]:
                    r = dict(r, audio=str(resolve_audio(r, base)))
                rows.append(r)
        return rows
    paths = ensure_demo_duplex(cfg.data.demo_dir or None, task.speech_tokens)
    return read_manifest(paths["dialogue"])


def _dialogue_codes(cfg: Any, task: Any) -> dict[str, np.ndarray]:
    """評估對話的助理語音碼（教師強制的輸入）：`data.codes_dirs`，示範對話則為其碼資料夾。"""
    codes: dict[str, np.ndarray] = {}
    if cfg.data.eval_manifests:
        for c in (x for x in str(cfg.data.get("codes_dirs", "") or "").split(",") if x):
            codes.update(load_codes(c))
        return codes
    paths = ensure_demo_duplex(cfg.data.demo_dir or None, task.speech_tokens)
    return load_codes(paths["dialogue_codes"])


class _CaptureForward:
    """包住模型：任務損失呼叫 `duplex_forward` 時留下輸出，讓評估與訓練走同一個前向與輸入位移。"""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.out: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def duplex_forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.out = self.model.duplex_forward(*args, **kwargs)
        return self.out


def tone_head_accuracy(
    cfg: Any, task: Any, model: Any, rows: list[dict[str, Any]], codes: dict | None = None
) -> dict[str, Any]:
    """聲調頭的教師強制正確率：逐段對話以訓練的逐列 op（`DUPLEX_TRAIN_OPS`，補齊到
    `data.max_frames`）建樣本，經任務損失的同一個前向，比較聲調 logits 的 argmax 與目標
    （只計目標 > 0 的位置）。

    樣本一律以 `tone_aware=True` 建立，不管執行的 `research.tone_aware`：消融 `tone_aware=False`
    的訓練資料聲調全為 0，這裡仍以真正的聲調為目標，量的是聲調頭實際學到什麼。
    每段一次前向、形狀固定所以只編譯一次；超過 `data.max_frames` 或壞掉的對話略過並計數。
    回傳 `tone_head_summary` 的欄位，加上 `dialogues`（計入的段數）與 `skipped`。
    """
    dcfg = dataclasses.replace(
        duplex_config(cfg, task.model_cfg.speech.num_codebooks), tone_aware=True
    )
    ctx = DuplexContext(
        task.tokenizer,
        dcfg,
        pad_id=task.pad_id,
        codes=codes or {},
        max_frames=int(cfg.data.max_frames),
        n_mels=int(cfg.data.n_mels),
    )
    transform = RowOps(compose(DUPLEX_TRAIN_OPS, ctx), DUPLEX_BATCH, SkipCounter(keep_items=False))

    @nnx.jit
    def predict(m: Any, batch: dict[str, Any]) -> Any:
        cap = _CaptureForward(m)
        task.loss(cap, batch, None)
        return jnp.argmax(cap.out["tones"], axis=-1)

    targets, preds = [], []
    for row in rows:
        ex = transform.process(row)
        if not transform.keep(ex):
            continue
        batch = {k: jnp.asarray(v)[None] for k, v in ex.items()}
        preds.append(np.asarray(predict(model, batch))[0])
        targets.append(ex["tones_target"])
    k = int(dcfg.max_chars_per_token)
    summary = tone_head_summary(
        np.concatenate(targets) if targets else np.zeros((0, k), np.int64),
        np.concatenate(preds) if preds else np.zeros((0, k), np.int64),
    )
    return {**summary, "dialogues": len(targets), "skipped": transform.skips.as_dict()}


def evaluate_duplex(cfg: Any, task: Any, model: Any, out_dir: Path, max_dialogues: int = 4) -> dict:
    """在對話上自由執行串流推論（任意長度，逐編碼窗），計算輪替指標並畫時間軸；
    同一批對話另算聲調頭的教師強制正確率（`tone_head_accuracy`，目標一律為聲調感知的真聲調）。

    無法評估的對話（音訊壞、清單列缺欄位）略過，依原因計數於 `skipped`、id 列於 `skipped_items`；
    `dialogues` 為實際評估的段數。
    """
    rows = _dialogue_rows(cfg, task)[:max_dialogues]
    # 與訓練相同的逐列 op（不補齊）：對話放上幀格，再取使用者聲道的梅爾 [n_mels, 4N]。
    ctx = DuplexContext(task.tokenizer, pad_id=task.pad_id, n_mels=int(cfg.data.n_mels))
    ops = compose(DUPLEX_EXAMPLE_OPS + "|log_mel", ctx)
    anns, acts, plots = [], [], []
    emo_true: list[str] = []
    emo_pred: list[str] = []
    skips = SkipCounter()
    for row in tqdm(rows, desc="對話", disable=len(rows) < 4):
        try:
            ann = TurnTakingAnnotation.from_row(row)
            ex = apply_ops(ops, {"row": row, "raw_codes": None})
        except AudioError as err:
            _skip(skips, row, err.reason, str(err))
            continue
        except (ValueError, KeyError, TypeError) as err:
            _skip(skips, row, "bad_row", str(err))
            continue
        n = ex["num_frames"]
        if n < 1:
            _skip(skips, row, "too_short", "不到一幀（40 毫秒）的音訊")
            continue
        feats = ex["mel"][None]
        out = run_streaming(
            model,
            feats,
            n,
            chunk_frames=25,
            pad_id=task.pad_id,
            keep_text_logits=False,
            turn_rule=TurnRule.from_dict(cfg.get("turn_rule")),
        )
        speaking = np.isin(out.turn[0], SPEAKING_ACTIONS)
        anns.append(ann)
        acts.append(speaking)
        plots.append(str(plot_timeline(ann, speaking, out_dir / f"timeline_{row['id']}.png")))
        if getattr(model, "emotion_head", None) is not None and row.get("emotion"):
            emo_true.append(str(row["emotion"]))
            emo_pred.append(predict_emotion(model, feats, n))
    metrics = turn_taking_metrics(anns, acts)
    report = {
        "dialogues": len(anns),
        **_skip_fields(skips),
        "metrics": metrics,
        "tone_head_accuracy": tone_head_accuracy(
            cfg, task, model, rows, _dialogue_codes(cfg, task)
        ),
        "timelines": plots,
    }
    if emo_true:
        report["emotion"] = emotion_report(emo_true, emo_pred, EMOTIONS)
        plots.append(str(plot_confusion(report["emotion"], out_dir / "emotion_confusion.png")))
    return report


def predict_emotion(model: Any, mel: Any, num_frames: int) -> str:
    """整段使用者聲道梅爾 `[1, n_mels, 4N]` → 情緒頭預測的標籤。

    與訓練時的前向相同（窗內全注意力）；超過編碼器上限時逐窗編碼後串接，在全部幀上平均。
    """
    user = encode_user_stream(model, mel, num_frames)
    logits = model.emotion_logits(user, jnp.ones(user.shape[:2], bool))
    return EMOTIONS[int(np.argmax(np.asarray(logits)[0]))]


def _plot_error_rates(asr: dict[str, Any], path: Path) -> Path | None:
    names = [k for k in ("cer", "wer", "mer", "pier") if asr.get(k) is not None]
    if not names:
        return None
    # 延後匯入：matplotlib 很重，只在畫圖時需要
    import matplotlib

    matplotlib.use("Agg")
    # 延後匯入：matplotlib 很重，只在畫圖時需要
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
    workdir: str | Path,
    step: int | None = None,
    max_utts: int = 32,
    max_dialogues: int = 4,
    manifest: str = "",
) -> dict[str, Any]:
    """評估並寫出 `<workdir>/eval/step_<N>/report.json` 與圖；回傳報表。

    `manifest`（逗號分隔）取代執行設定的 `data.eval_manifests`，例如在另一個 test 切分上評估。
    """
    cfg, task, model, step = load_run(workdir, step)
    if manifest:
        with cfg.unlocked():
            cfg.data.eval_manifests = manifest
    out_dir = Path(workdir) / "eval" / f"step_{step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"workdir": str(workdir), "step": step, "phase": cfg.phase}
    try:
        if cfg.task == "asr_connector":
            report["asr"] = evaluate_asr(cfg, task, model, max_utts)
            plot = _plot_error_rates(report["asr"], out_dir / "error_rates.png")
            report["plots"] = [str(plot)] if plot else []
        else:
            report["duplex"] = evaluate_duplex(cfg, task, model, out_dir, max_dialogues)
            report["plots"] = report["duplex"]["timelines"]
    except Exception as err:
        report["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        (out_dir / "report.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2, default=float) + "\n",
            encoding="utf-8",
        )
    return report
