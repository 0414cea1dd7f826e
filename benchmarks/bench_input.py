"""輸入管線吞吐量：每秒、每核處理多少秒音訊，並在同一次執行中對照 `WhisperFeatureExtractor` 迴圈。

python benchmarks/bench_input.py [--manifest M.jsonl] [--tokenizer_dir DIR] [--utterances 48]

不給清單時以 espeak-ng 合成中英文語句（需要 espeak-ng）。兩邊都包含讀檔與重取樣到 16 kHz；
管線另外做分詞、聲調、語言編號、分桶與補齊（`pipeline` 為動態分桶，`pipeline_sync` 為全域批次計畫）。「每核」以行程 CPU 時間（所有執行緒合計）計算；各項輪流執行 --repeats 輪，取 CPU 時間最少的一次。
對照組有兩種：`WhisperFeatureExtractor` 預設（補到 30 秒，Whisper 的標準用法）與不補齊
（`padding="longest"`）；比值 = 管線每 CPU 秒音訊秒數 ÷ 對照組每 CPU 秒音訊秒數。

同一次執行也把語料送過離線鏈（`inline`，不切分）寫成 ArrayRecord 分片，量測訓練主機上
分片與 JSONL+WAV 兩條路徑：`audio_*` 只含取得 16 kHz 波形（讀檔、解碼、重取樣 vs 讀紀錄），
`pipeline_*` 是整條管線（另含對數梅爾與分詞）。
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import soundfile as sf  # noqa: E402

from speakllm_jax.audio.constants import HOP_LENGTH, SAMPLE_RATE  # noqa: E402
from speakllm_jax.audio.io import load_audio  # noqa: E402
from speakllm_jax.data.manifest import read_manifest  # noqa: E402
from speakllm_jax.data.offline_chain import ChainConfig, run_chain  # noqa: E402
from speakllm_jax.data.pipeline import PipelineConfig, build_pipeline  # noqa: E402
from speakllm_jax.data.shards import shard_rows  # noqa: E402
from speakllm_jax.data.transforms import shard_audio  # noqa: E402
from speakllm_jax.text.tokenizer import (  # noqa: E402
    TextTokenizer,
    build_qwen_tokenizer_dir,
    default_tokenizer_dir,
)

ZH = [
    "今天天气很好，我们去公园散步吧。",
    "明天的会议改到下午三点，请大家准时参加。",
    "孩子长大了，这条路的长度很重要。",
    "我去银行取钱，顺便买一杯咖啡。",
    "这个project的deadline是下周五。",
    "请把电脑关掉，然后检查一下邮件。",
]
EN = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the report by Friday.",
    "Good morning everyone, let us begin the meeting.",
]


def make_corpus(out: Path, n: int) -> Path:
    """以 espeak-ng 合成 n 句（中英交替），寫出清單。"""
    rows = []
    for i in range(n):
        voice, text = ("en-us", EN[i % len(EN)]) if i % 3 == 2 else ("cmn", ZH[i % len(ZH)])
        wav = out / f"b{i:03d}.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(140 + 7 * (i % 9)), "-w", str(wav), text],
            check=True,
            capture_output=True,
        )
        info = sf.info(str(wav))
        rows.append(
            {
                "id": f"b{i:03d}",
                "audio": wav.name,
                "offset": 0.0,
                "duration": info.duration,
                "sample_rate": info.samplerate,
                "channels": 1,
                "text": text,
                "language": "en" if voice == "en-us" else "zh",
                "speaker": voice,
                "corpus": "espeak",
                "split": "train",
            }
        )
    m = out / "bench.jsonl"
    m.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return m


def _measure(fns: dict, repeats: int) -> dict:
    """輪流執行各項 `repeats` 輪，每項取 CPU 時間最少的一次（共用機器上有其他負載時較穩定）。"""
    best: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            seconds = fn()
            res = (seconds, time.perf_counter() - w0, time.process_time() - c0)
            if name not in best or res[2] < best[name][2]:
                best[name] = res
    return best


def run_pipeline(manifest: Path, tokenizer, threads: int, sync: bool = False) -> float:
    cfg = PipelineConfig(
        batch_size=8,
        num_epochs=1,
        drop_remainder=False,
        read_threads=threads,
        shuffle=True,
        sync_buckets=sync,
    )
    total = 0
    for b in build_pipeline(manifest, cfg, tokenizer, 0, 1).iterator():
        total += int(b["mel_lengths"][b["example_mask"]].sum())
    return total * HOP_LENGTH / SAMPLE_RATE


def run_pipeline_source(source: str, tokenizer, threads: int) -> float:
    """同 `run_pipeline`，來源為 `shards:DIR` 等規格。"""
    return run_pipeline(source, tokenizer, threads)  # type: ignore[arg-type]


def run_audio_jsonl(manifest: Path) -> float:
    """JSONL+WAV：每筆讀檔、解碼、重取樣到 16 kHz。"""
    total = 0
    for r in read_manifest(manifest):
        total += len(
            load_audio(
                manifest.parent / r["audio"],
                SAMPLE_RATE,
                r["offset"],
                r["duration"],
                max_seconds=30.0,
            )
        )
    return total / SAMPLE_RATE


def run_audio_shards(directory: Path) -> float:
    """分片：每筆隨機存取讀一個紀錄，取出 16 kHz PCM。"""
    return sum(len(shard_audio(r, 30.0)) for r in shard_rows(directory)) / SAMPLE_RATE


def run_whisper_fe(manifest: Path, pad: bool) -> float:
    # 延後匯入：transformers 很重，只有對照組用到
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    total = 0.0
    for r in read_manifest(manifest):
        audio = load_audio(manifest.parent / r["audio"], target_sr=SAMPLE_RATE)
        kw = {} if pad else {"padding": "longest"}
        feats = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", **kw)["input_features"]
        assert feats.shape[1] == 80
        total += len(audio) / SAMPLE_RATE
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", default=None, help="JSONL 清單；不給則以 espeak-ng 合成")
    p.add_argument("--utterances", type=int, default=48, help="合成語句數")
    p.add_argument(
        "--tokenizer_dir", default=None, help="Qwen 分詞器資料夾；預設由 qwen-tokenizer 建立"
    )
    p.add_argument("--threads", type=int, default=1, help="管線讀取執行緒數")
    p.add_argument("--repeats", type=int, default=5, help="輪流重複的輪數（每項取 CPU 時間最少者）")
    a = p.parse_args(argv)

    tok_dir = a.tokenizer_dir or build_qwen_tokenizer_dir(default_tokenizer_dir())
    tokenizer = TextTokenizer.from_dir(tok_dir)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(a.manifest) if a.manifest else make_corpus(Path(tmp), a.utterances)
        shards = Path(tmp) / "shards"
        chain = ChainConfig(conversion=None, vad=False, write_wavs=False)
        run_chain(manifest, shards, 4, chain, runner="inline", log=lambda s: None)
        source = f"shards:{shards}"
        run_pipeline(manifest, tokenizer, a.threads)  # 暖身（載入、快取）
        run_pipeline_source(source, tokenizer, a.threads)
        run_whisper_fe(manifest, pad=False)
        results = _measure(
            {
                "audio_jsonl_wav": lambda: run_audio_jsonl(manifest),
                "audio_shards": lambda: run_audio_shards(shards),
                "pipeline_shards": lambda: run_pipeline_source(source, tokenizer, a.threads),
                "pipeline": lambda: run_pipeline(manifest, tokenizer, a.threads),
                "pipeline_sync": lambda: run_pipeline(manifest, tokenizer, a.threads, True),
                "whisper_fe_pad30s": lambda: run_whisper_fe(manifest, pad=True),
                "whisper_fe_nopad": lambda: run_whisper_fe(manifest, pad=False),
            },
            a.repeats,
        )
    print(f"cpu_count={os.cpu_count()} pipeline_threads={a.threads} best_of={a.repeats}")
    print(
        f"{'':20s} {'audio_s':>9s} {'wall_s':>8s} {'cpu_s':>8s} {'audio_s/wall_s':>15s} "
        f"{'audio_s/cpu_s':>14s}"
    )
    per_core = {}
    for name, (audio_s, wall, cpu) in results.items():
        per_core[name] = audio_s / cpu
        print(
            f"{name:20s} {audio_s:9.1f} {wall:8.2f} {cpu:8.2f} {audio_s / wall:15.1f} "
            f"{per_core[name]:14.1f}"
        )
    print(
        "ratio shards / jsonl+wav, audio stage (per core): "
        f"{per_core['audio_shards'] / per_core['audio_jsonl_wav']:.2f}x"
    )
    print(
        "ratio shards / jsonl+wav, whole pipeline (per core): "
        f"{per_core['pipeline_shards'] / per_core['pipeline']:.2f}x"
    )
    for ref in ("whisper_fe_pad30s", "whisper_fe_nopad"):
        print(f"ratio pipeline / {ref} (per core): {per_core['pipeline'] / per_core[ref]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
