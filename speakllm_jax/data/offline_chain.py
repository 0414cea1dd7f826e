"""離線資料鏈：清單 → 驗證 → 文字正規化 → 重取樣 + VAD 切分 → 選用語音碼 → ArrayRecord 分片。

工作單位是一個分片（輸入清單的一段連續列）；`process_shard` 是純函式，同一份程式碼由三種
執行器排程：

- `inline`：在本行程依序執行（除錯用）。
- `local`：本機 Ray 叢集（`ray.init(num_cpus=num_workers)`），每個工作者一次做一個分片。
- `ray://HOST:PORT` 或 `auto`：連上既有的 Ray 叢集（GKE、TPU VM、GPU 節點）。

確定性：分片 k 固定為輸入的第 `[k·N/S, (k+1)·N/S)` 列；紀錄位元組只取決於輸入與設定。
續跑：分片完成時寫標記（輸入指紋、筆數、位元組數）；重跑時標記相符的分片不再處理。
壞列、壞檔依原因計數，寫進略過報告，不會中斷。語音碼抽取器每個工作行程只載入一次。
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.io import SkipCounter, write_audio
from speakllm_jax.audio.vad import VadConfig, split_row
from speakllm_jax.data import shards as sh
from speakllm_jax.data.manifest import iter_manifest, resolve_path, write_manifest
from speakllm_jax.text.manifest_text import normalize_row
from speakllm_jax.text.tones import char_tones

RUNNERS = ("inline", "local")


def check_runner(runner: str) -> str:
    """`inline`、`local`、`auto` 或 `ray://HOST:PORT`；其他值以 ValueError 指出。"""
    if runner in RUNNERS or runner == "auto" or runner.startswith("ray://"):
        return runner
    raise ValueError(f"--runner 必須是 inline、local、auto 或 ray://HOST:PORT，收到 {runner!r}")


@dataclass
class ChainConfig:
    """離線鏈的設定；`conversion=None` 表示不正規化文字，`tokenizer=None` 表示不抽語音碼。"""

    conversion: str | None = "t2s"
    verbalize_numbers: bool = False
    keep_punct: bool = True
    target_sr: int = SAMPLE_RATE
    vad: bool = True
    max_seconds: float = 30.0
    aggressiveness: int = 2
    hangover_ms: int = 300
    min_seconds: float = 0.2
    audio_format: str = "pcm16"
    write_wavs: bool = True
    tokenizer: str | None = None
    checkpoint: str | None = None
    device: str = "cpu"
    token_batch_size: int = 8
    # PyTorch 語音碼抽取器的載入函式（`模組:函式`）；由入口給（data/ 不匯入 export/）。
    tokenizer_loader: str = ""

    def validate(self) -> None:
        if self.audio_format not in sh.AUDIO_FORMATS:
            raise ValueError(f"audio_format 必須是 {sh.AUDIO_FORMATS} 之一：{self.audio_format!r}")
        if self.tokenizer and not self.checkpoint:
            raise ValueError("抽語音碼（tokenizer）需要 checkpoint")
        if self.tokenizer and ":" not in self.tokenizer_loader:
            raise ValueError("抽語音碼（tokenizer）需要 tokenizer_loader（`模組:函式`，由入口給）")


# ---------------------------------------------------------------- 工作者端


_TOKENIZERS: dict[tuple[str, str, str], Any] = {}


def _speech_tokenizer(cfg: ChainConfig) -> Any:
    """每個工作行程只載入一次模型（Ray 重複使用工作行程，之後的分片直接取用）。"""
    key = (cfg.tokenizer_loader, str(cfg.tokenizer), str(cfg.checkpoint), str(cfg.device))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        module, name = cfg.tokenizer_loader.split(":", 1)
        load_speech_tokenizer = getattr(importlib.import_module(module), name)
        tok = _TOKENIZERS[key] = load_speech_tokenizer(
            str(cfg.tokenizer), str(cfg.checkpoint), device=cfg.device
        )
    return tok


def _row_pieces(
    row: dict[str, Any], cfg: ChainConfig, skips: SkipCounter, key: str
) -> list[tuple[dict[str, Any], Any, Any]]:
    if cfg.conversion:
        reason = normalize_row(row, cfg.conversion, cfg.verbalize_numbers, cfg.keep_punct)
        if reason:
            skips.add(row.get("id", key), reason, "文字正規化")
            return []
    vad = VadConfig(aggressiveness=cfg.aggressiveness, hangover_ms=cfg.hangover_ms)
    return split_row(
        row,
        None,
        skips,
        cfg.target_sr,
        cfg.vad,
        cfg.max_seconds,
        vad,
        cfg.min_seconds,
        key=key,
    )


def process_shard(task: dict[str, Any]) -> dict[str, Any]:
    """處理一個分片並寫出 ArrayRecord 檔與完成標記；回傳標記內容（含清單列與略過）。"""
    cfg = ChainConfig(**task["config"])
    out = Path(task["output_dir"])
    name = sh.shard_name(task["shard"], task["num_shards"])
    skips = SkipCounter()
    pieces: list[tuple[dict[str, Any], Any, Any]] = []
    for i, row in enumerate(task["rows"]):
        try:
            pieces += _row_pieces(dict(row), cfg, skips, f"{name}:{i}")
        except Exception as e:  # 單筆的意外錯誤不中斷整個分片
            skips.add(row.get("id", f"{name}:{i}"), "error", f"{type(e).__name__}: {e}")
    codes: list[dict[str, Any]] = [{} for _ in pieces]
    if cfg.tokenizer and pieces:
        tok = _speech_tokenizer(cfg)
        mono = [(k, p[1]) for k, p in enumerate(pieces) if p[1].ndim == 1]
        for s in range(0, len(mono), cfg.token_batch_size):
            part = mono[s : s + cfg.token_batch_size]
            for (k, _), c in zip(part, tok.encode([w for _, w in part])):
                codes[k][cfg.tokenizer] = c
    records, rows_out = [], []
    for k, (new, wave, resp) in enumerate(pieces):
        if cfg.write_wavs:
            folder = out / "audio" / str(new["corpus"])
            p = write_audio(folder / f"{new['id']}.wav", wave, cfg.target_sr)
            new["audio"] = os.path.relpath(p, out)
            if resp is not None:
                rp = write_audio(folder / f"{new['id']}_response.wav", resp, cfg.target_sr)
                new["response_audio"] = os.path.relpath(rp, out)
        else:
            new["audio"] = f"{name}.array_record#{k}"
        text = new.get("text") if isinstance(new.get("text"), str) else ""
        records.append(
            sh.encode_record(
                new,
                wave,
                cfg.target_sr,
                cfg.audio_format,
                codes=codes[k],
                tones=char_tones(text),
                response=resp,
            )
        )
        rows_out.append(new)
    size = sh.write_shard(out / f"{name}.array_record", records)
    marker = {
        "file": f"{name}.array_record",
        "fingerprint": task["fingerprint"],
        "records": len(records),
        "bytes": size,
        "input_rows": len(task["rows"]),
        "sha256": hashlib.sha256((out / f"{name}.array_record").read_bytes()).hexdigest(),
        "rows": rows_out,
        "skips": [list(t) for t in skips.items],
    }
    sh.write_json_atomic(out / f"{name}.json", marker)
    return marker


# ---------------------------------------------------------------- 排程端


def _fingerprint(rows: list[dict[str, Any]], cfg: ChainConfig) -> str:
    blob = json.dumps(
        {"format": sh.SHARD_FORMAT, "config": dataclasses.asdict(cfg), "rows": rows},
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _finished(out: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    """標記存在、指紋相符且分片檔大小一致時回傳標記，否則 None（需要重做）。"""
    mp, ap = out / f"{name}.json", out / f"{name}.array_record"
    if not (mp.is_file() and ap.is_file()):
        return None
    try:
        marker = json.loads(mp.read_text("utf-8"))
    except ValueError:
        return None
    if marker.get("fingerprint") != fingerprint or marker.get("bytes") != ap.stat().st_size:
        return None
    return marker


def _run_tasks(tasks: list[dict[str, Any]], runner: str, num_workers: int) -> list[dict]:
    """依執行器跑分片任務，回傳順序與 `tasks` 相同。"""
    if not tasks:
        return []
    if runner == "inline":
        return [process_shard(t) for t in tasks]
    # 延後匯入：ray 很重，只在分散式執行時需要
    import ray

    started = False
    if not ray.is_initialized():
        # 本機工作者繼承環境變數：讓它們匯入的是這份程式碼（而不是另一份已安裝的副本）。
        root = str(Path(__file__).resolve().parents[2])
        paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if runner == "local":
            ray.init(
                num_cpus=max(1, int(num_workers)),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=runner, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=2)(process_shard)
        return ray.get([remote.remote(t) for t in tasks])
    finally:
        if started:
            ray.shutdown()


def run_chain(
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_shards: int,
    config: ChainConfig | None = None,
    runner: str = "local",
    num_workers: int = 2,
    log: Any = print,
) -> dict[str, Any]:
    """整份清單走過離線鏈，寫出分片、`index.json`、`manifest.jsonl` 與略過報告；回傳摘要。

    `runner`：`inline`、`local`（本機 Ray，`num_workers` 個工作者）或 Ray 叢集位址。
    已完成（標記與輸入指紋相符）的分片不重做，摘要的 `reused` 記數量。
    """
    cfg = config or ChainConfig()
    cfg.validate()
    check_runner(runner)
    if num_shards <= 0:
        raise ValueError(f"num_shards 必須為正，收到 {num_shards}")
    src = Path(manifest)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mskips = SkipCounter()
    rows = []
    for row in iter_manifest(src, mskips):
        # 音訊路徑改成絕對路徑：工作者不需要知道清單在哪裡。
        for k in ("audio", "response_audio"):
            if isinstance(row.get(k), str) and row[k]:
                row[k] = str(resolve_path(row[k], src.parent))
        rows.append(row)
    n = len(rows)
    bounds = [k * n // num_shards for k in range(num_shards + 1)]
    tasks, markers = [], {}
    for k in range(num_shards):
        part = rows[bounds[k] : bounds[k + 1]]
        fp = _fingerprint(part, cfg)
        name = sh.shard_name(k, num_shards)
        done = _finished(out, name, fp)
        if done is not None:
            markers[k] = done
            continue
        tasks.append(
            {
                "shard": k,
                "num_shards": num_shards,
                "rows": part,
                "output_dir": str(out),
                "config": dataclasses.asdict(cfg),
                "fingerprint": fp,
            }
        )
    for t, m in zip(tasks, _run_tasks(tasks, runner, num_workers)):
        markers[t["shard"]] = m
    skips = SkipCounter()
    skips.update(mskips)
    rows_out: list[dict[str, Any]] = []
    shards = []
    for k in range(num_shards):
        m = markers[k]
        for key, reason, detail in m["skips"]:
            skips.add(key, reason, detail)
        for r in m["rows"]:
            rows_out.append(dict(r, shard_record=len(rows_out)))
        shards.append({"file": m["file"], "records": m["records"], "bytes": m["bytes"]})
    write_manifest(out / sh.MANIFEST_FILE, rows_out)
    skips.write_jsonl(out / sh.SKIPPED_FILE)
    index = {
        "format": sh.SHARD_FORMAT,
        "num_shards": num_shards,
        "records": len(rows_out),
        "shards": shards,
        "config": dataclasses.asdict(cfg),
    }
    sh.write_json_atomic(out / sh.INDEX_FILE, index)
    summary = {
        "input_rows": n,
        "records": len(rows_out),
        "shards": num_shards,
        "processed": len(tasks),
        "reused": num_shards - len(tasks),
        "skipped": skips.report(),
        "skipped_file": str(out / sh.SKIPPED_FILE),
        "output": str(out),
    }
    log(
        f"{n} 列 → {len(rows_out)} 筆紀錄，{num_shards} 個分片（本次處理 {len(tasks)}，"
        f"沿用 {num_shards - len(tasks)}）到 {out}"
    )
    log(skips.table())
    return summary
