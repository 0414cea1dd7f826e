"""第 1–3 階段的訓練任務：全雙工幀模型（SFT、雙工、情緒共用）。

每筆資料是一列雙聲道對話（聲道 0 使用者、聲道 1 助理；語音指令配對先排成這種對話），
由 `config.data.ops` 組合的逐列 op（預設 `data.duplex.DUPLEX_TRAIN_OPS`）放上 25 Hz 幀格、
補齊到 `data.max_frames` 幀，欄位依 `data.duplex.DUPLEX_BATCH` 綱要。
助理第 t 幀的輸入是它第 t-1 幀的輸出（文字符號、聲調、語音碼），目標是第 t 幀的輸出。

損失由 `training.losses.duplex_loss` 計算（各項的定義與正規化見該模組與
`docs/research_modules.md`）。文字目標在無文字的幀為填充符號，權重 `pad_weight`；搶話後被遮掉的幀
也以填充符號為目標（助理應該停下）。各研究模組的消融開關在 `config.research`。
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.audio.io import SkipCounter
from speakllm_jax.cli import UserValueError
from speakllm_jax.data.demo_data import (
    DEMO_SPEECH_TOKENIZERS,
    REPO_ROOT,
    default_demo_dir,
    duplex_paths,
)
from speakllm_jax.data.duplex import (
    DUPLEX_BATCH,
    DUPLEX_TRAIN_OPS,
    DuplexConfig,
    DuplexContext,
    duplex_batch_sizes,
)
from speakllm_jax.data.manifest import read_manifest
from speakllm_jax.data.ops import RowOps, compose
from speakllm_jax.data.overlap import OverlapConfig
from speakllm_jax.data.schema import BatchSchema
from speakllm_jax.data.speech_tokens import load_codes
from speakllm_jax.models.speakllm import SpeakLLM, build_speakllm_config
from speakllm_jax.training.losses import LossWeights, duplex_loss
from speakllm_jax.training.tasks.base import (
    DataIterator,
    GrainBatches,
    Task,
    load_pretrained_parts,
    register_task,
    text_tokenizer,
)


def duplex_config(config: Any, num_codebooks: int) -> DuplexConfig:
    """訓練設定（`config.research`、`config.model`）→ 逐列處理用的 `DuplexConfig`。"""
    r = config.research
    return DuplexConfig(
        lead_frames=int(r.lead_frames) if r.dual_scale else 0,
        tone_aware=bool(r.tone_aware),
        overlap=OverlapConfig(
            reaction_frames=int(r.reaction_frames),
            barge_in_weight=float(r.barge_in_weight),
            backchannel_weight=float(r.backchannel_weight),
            ablation=not bool(r.overlap_aware),
        ),
        max_chars_per_token=int(config.model.max_chars_per_token),
        num_codebooks=int(num_codebooks),
    )


def _shift(x: jax.Array, fill: Any) -> jax.Array:
    """沿幀軸右移一格：第 t 幀拿到第 t-1 幀的值，第 0 幀為 fill。"""
    first = jnp.full_like(x[:, :1], fill)
    return jnp.concatenate([first, x[:, :-1]], axis=1)


@register_task("duplex")
class DuplexTask(Task):
    """全雙工幀模型；`data.duplex_sets` 選資料（demo 的 instructions、dialogue 或清單路徑）。"""

    def __init__(self, config: Any):
        super().__init__(config)
        self.model_cfg = build_speakllm_config(config.model, config.lora)
        chunk = self.model_cfg.stream_chunk_frames
        self.stream_chunk_enc = chunk * self.model_cfg.connector_stack if chunk > 0 else None
        # 語音頭與它所用的語音符號同名（voila：4 層 RVQ；cosyvoice2：單碼本 FSQ），
        # 示範資料的碼資料夾依此選擇。
        head = self.model_cfg.speech_head
        if head not in DEMO_SPEECH_TOKENIZERS:
            raise ValueError(
                f"duplex 任務需要 model.speech_head 為 {DEMO_SPEECH_TOKENIZERS} 之一，得到 {head!r}"
            )
        self.speech_tokens = head
        self.tokenizer = text_tokenizer(config)
        self.pad_id = int(self.tokenizer.eos_id)
        self.loss_w = LossWeights.from_config(config.loss)
        try:
            # 建立時就組一次 op：`data.ops` 寫錯在訓練開始前就以一行錯誤結束（結束碼 2）。
            self.row_ops({})
        except ValueError as err:
            raise UserValueError(f"--config.{err}") from err

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return SpeakLLM(self.model_cfg, rngs=rngs)

    def load_pretrained(self, model: nnx.Module) -> nnx.Module:
        return load_pretrained_parts(model, self.config.model, self.model_cfg)

    def _rows_and_codes(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        d = self.config.data
        rows: list[dict] = []
        codes: dict[str, np.ndarray] = {}
        if d.train_manifests:
            for m in str(d.train_manifests).split(","):
                rows += read_manifest(m)
            if d.codes_dirs:
                for c in str(d.codes_dirs).split(","):
                    codes.update(load_codes(c))
        else:
            paths = ensure_demo_duplex(d.demo_dir or None, self.speech_tokens)
            for name in str(d.duplex_sets).split(","):
                rows += read_manifest(paths[name])
                codes.update(load_codes(paths[f"{name}_codes"]))
        n = int(d.get("subset", 0))
        # 過擬合實驗：只取前 n 段（清單順序，決定性）。
        return (rows[:n] if n > 0 else rows), codes

    def row_ops(self, codes: dict[str, np.ndarray], skips: SkipCounter | None = None) -> RowOps:
        """逐列處理：`config.data.ops`（空白為 `DUPLEX_TRAIN_OPS`）→ `DUPLEX_BATCH` 的欄位。"""
        ctx = DuplexContext(
            self.tokenizer,
            duplex_config(self.config, self.model_cfg.speech.num_codebooks),
            pad_id=self.pad_id,
            codes=codes,
            max_frames=int(self.config.data.max_frames),
            n_mels=int(self.config.data.n_mels),
        )
        spec = str(self.config.data.get("ops", "") or DUPLEX_TRAIN_OPS)
        skips = SkipCounter(keep_items=False) if skips is None else skips
        return RowOps(compose(spec, ctx), DUPLEX_BATCH, skips)

    def make_data(self, process_index: int, process_count: int) -> DataIterator:
        rows, codes = self._rows_and_codes()
        if not rows:
            raise ValueError("全雙工資料是空的：請檢查 data.train_manifests 或 data.duplex_sets")
        transform = self.row_ops(codes)
        local = int(self.config.train.batch_size) // process_count
        ds = (
            grain.MapDataset.source(rows)
            .shuffle(seed=int(self.config.seed))
            .repeat(None)[process_index::process_count]
            .map(transform.process)
            .to_iter_dataset()
            .filter(transform.keep)
            .batch(local, drop_remainder=True)
        )
        return GrainBatches(iter(ds), skipped=transform.skips)

    def batch_schema(self) -> BatchSchema:
        return DUPLEX_BATCH

    def batch_sizes(self, frames: int | None = None, text_len: int | None = None) -> dict:
        del text_len
        m = int(frames if frames is not None else self.config.data.max_frames)
        return duplex_batch_sizes(
            m,
            int(self.config.data.n_mels),
            int(self.config.model.max_chars_per_token),
            int(self.model_cfg.speech.num_codebooks),
        )

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(np.sum(batch["frame_mask"]))

    def loss(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple:
        del rng
        text_t = batch["text_target"]
        text_in = _shift(text_t, self.pad_id)
        tones_in = _shift(batch["tones_target"], 0)
        codes_in = _shift(batch["codes_target"], 0)
        codes_valid = _shift(batch["code_weight"] > 0, False)
        cond = batch["emotion_token"] if self.config.research.emotion_condition else None
        out = model.duplex_forward(
            batch["mel"],
            batch["mel_mask"],
            text_in,
            tones_in,
            codes_in,
            codes_valid,
            batch["codes_target"],
            batch["frame_mask"],
            cond_ids=cond,
            # 與串流推論相同的編碼器遮罩（區塊因果、有界左方脈絡；見 SpeakLLMConfig）。
            chunk_frames=self.stream_chunk_enc,
            # cosyvoice2 的 talker 融合思考者隱狀態與該幀輸出的文字（教師強制即文字目標）。
            text_out=text_t if self.model_cfg.speech_head == "cosyvoice2" else None,
        )
        return duplex_loss(out, batch, self.loss_w)


def ensure_demo_duplex(demo_dir: str | None, tokenizer: str = "voila") -> dict[str, Any]:
    """示範全雙工資料不存在時，以子程序執行 `data/prepare_demo_speech.py`（那裡才匯入 PyTorch）。

    `tokenizer` 為 `voila` 或 `cosyvoice2`：兩者共用清單，語音碼放在各自的資料夾。
    """
    paths = duplex_paths(demo_dir or default_demo_dir(), tokenizer)
    done = all((paths[f"{n}_codes"] / "index.jsonl").exists() for n in ("dialogue", "instructions"))
    if not done:
        cmd = [sys.executable, str(REPO_ROOT / "data" / "prepare_demo_speech.py")]
        if demo_dir:
            cmd += ["--demo_dir", str(demo_dir)]
        cmd += ["--tokenizer", tokenizer, "--no_next"]
        subprocess.run(cmd, check=True)
    return paths
