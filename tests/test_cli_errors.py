"""每個 CLI 遇到典型的使用者錯誤：結束碼 2、stderr 只有一行 `錯誤：…`（指出欄位／檔案）、沒有 traceback。

所有案例在模組層級的 fixture 中以子程序平行執行一次，各參數化測試只檢查自己的結果。
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _files(root: Path) -> dict[str, Path]:
    """案例用到的真實輸入檔：空清單、壞 JSON 清單、一列清單、音檔、假的匯出資料夾、空語料。"""
    empty = root / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    bad = root / "bad.jsonl"
    bad.write_text('{"id": "a", \n', encoding="utf-8")
    one = root / "one.jsonl"
    one.write_text(json.dumps({"id": "u1", "audio": "x.wav"}) + "\n", encoding="utf-8")
    wav = root / "q.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    model = root / "exported"
    model.mkdir()
    (model / "heads_config.json").write_text(json.dumps({"speech_head": "voila"}))
    run = root / "run_no_ckpt"
    run.mkdir()
    (run / "config.json").write_text("{}")
    pt = root / "llm.pt"
    pt.write_bytes(b"")  # 只看副檔名：JAX 端不讀 pickle
    aishell = root / "aishell"
    (aishell / "transcript").mkdir(parents=True)
    (aishell / "transcript" / "aishell_transcript_v0.8.txt").write_text("")
    (aishell / "wav").mkdir()
    return {
        "empty": empty,
        "bad": bad,
        "one": one,
        "wav": wav,
        "model": model,
        "run": run,
        "aishell": aishell,
        "missing": root / "missing",
        "pt": pt,
        "reply": root / "reply.wav",
    }


# （名稱, 參數（{鍵} 以 _files 的路徑代入）, stderr 那一行必須包含的字串）
CASES: list[tuple[str, list[str], list[str]]] = [
    ("train_unknown_config", ["launch/train.py", "--config", "phase9"], ["--config phase9"]),
    (
        "train_unknown_field",
        ["launch/train.py", "--config.optim.lrr=1"],
        ["optim.lrr", "optim.lr"],
    ),
    (
        "train_bad_int",
        ["launch/train.py", "--config.train.steps=abc"],
        ["--config.train.steps 需要 int，收到 'abc'"],
    ),
    (
        "train_bad_bool",
        ["launch/train.py", "--config.logging.plot=maybe"],
        ["--config.logging.plot 需要 bool"],
    ),
    (
        "train_missing_init_from",
        ["launch/train.py", "--config.checkpoint.init_from={missing}"],
        ["--config.checkpoint.init_from", "{missing}"],
    ),
    (
        "train_missing_manifest",
        ["launch/train.py", "--config.data.train_manifests={missing}.jsonl"],
        ["--config.data.train_manifests", "{missing}.jsonl"],
    ),
    (
        "train_bad_mesh",
        ["launch/train.py", "--config.mesh.fsdp=0"],
        ["--config.mesh.fsdp=0"],
    ),
    (
        "train_unknown_preset",
        ["launch/train.py", "--config.preset=huge"],
        ["--config.preset=huge", "tiny"],
    ),
    (
        "train_talker_pickle",
        ["launch/train.py", "--config", "phase2", "--config.model.talker_path={pt}"],
        ["--config.model.talker_path={pt}", "python -m export.convert_llm_pt --input {pt}"],
    ),
    (
        "convert_missing_pt",
        ["-m", "export.convert_llm_pt", "--input", "{missing}.pt"],
        ["--input", "{missing}.pt"],
    ),
    (
        "train_file_config_bad_preset",
        ["launch/train.py", "--config", "configs/phase2_duplex.py:preset=huge"],
        ["--config configs/phase2_duplex.py:preset=huge", "tiny"],
    ),
    ("evaluate_no_workdir_flag", ["launch/evaluate.py"], ["--workdir"]),
    ("evaluate_missing_workdir", ["launch/evaluate.py", "--workdir", "{missing}"], ["{missing}"]),
    (
        "evaluate_missing_manifest",
        ["launch/evaluate.py", "--workdir", "{run}", "--manifest", "{missing}"],
        ["--manifest", "{missing}"],
    ),
    (
        "evaluate_no_checkpoint",
        ["launch/evaluate.py", "--workdir", "{run}"],
        ["{run}", "檢查點"],
    ),
    ("plan_bad_mesh", ["launch/plan.py", "--mesh", "fsdp=8,pipe=2"], ["--mesh", "pipe"]),
    (
        "plan_unknown_config",
        ["launch/plan.py", "--config", "phase9", "--mesh", "fsdp=1", "--no_compile"],
        ["phase9"],
    ),
    (
        "export_missing_run",
        ["-m", "export.to_torch", "--checkpoint", "{missing}", "--out", "{missing}_out"],
        ["--checkpoint", "{missing}"],
    ),
    (
        "server_missing_model",
        ["-m", "export.serving.server", "--config.model_dir=/path/export"],
        ["--config.model_dir=/path/export"],
    ),
    (
        "server_placeholder_voila",
        [
            "-m",
            "export.serving.server",
            "--config.model_dir={model}",
            "--config.voila_dir=/path/Voila-Tokenizer",
        ],
        ["--config.voila_dir=/path/Voila-Tokenizer"],
    ),
    (
        "web_missing_model",
        ["-m", "export.serving.web", "--config.model_dir=/path/export"],
        ["--config.model_dir=/path/export"],
    ),
    (
        "server_bad_port",
        ["-m", "export.serving.server", "--config.port=abc"],
        ["--config.port 需要 int"],
    ),
    (
        "client_missing_audio",
        ["-m", "export.serving.client", "stream", "--audio", "{missing}.wav", "--out", "{reply}"],
        ["--audio", "{missing}.wav"],
    ),
    (
        "client_unreachable",
        [
            "-m",
            "export.serving.client",
            "stream",
            "--audio",
            "{wav}",
            "--out",
            "{reply}",
            "--fast",
            "--tail-seconds",
            "0",
            "--target",
            "127.0.0.1:1",
        ],
        ["--target 127.0.0.1:1"],
    ),
    (
        "normalize_empty",
        ["data/normalize_text_zh.py", "--manifest", "{empty}", "--output", "{missing}/n.jsonl"],
        ["{empty}", "清單沒有任何列"],
    ),
    (
        "resample_empty",
        ["data/resample_split.py", "--manifest", "{empty}", "--output_dir", "{missing}_rs"],
        ["{empty}", "清單沒有任何列"],
    ),
    (
        "resample_bad_json",
        ["data/resample_split.py", "--manifest", "{bad}", "--output_dir", "{missing}_rs"],
        ["{bad}:1", "清單沒有任何列"],
    ),
    (
        "build_missing_root",
        [
            "data/build_manifests.py",
            "--corpus",
            "aishell1",
            "--root",
            "{missing}",
            "--output",
            "{missing}_b/m.jsonl",
        ],
        ["{missing}"],
    ),
    (
        "build_empty_corpus",
        [
            "data/build_manifests.py",
            "--corpus",
            "aishell1",
            "--root",
            "{aishell}",
            "--output",
            "{missing}_e/m.jsonl",
        ],
        ["{missing}_e/m.jsonl", "清單沒有任何列"],
    ),
    (
        "build_missing_config",
        ["data/build_manifests.py", "--config", "{missing}.py", "--output", "{missing}.jsonl"],
        ["--config", "{missing}.py"],
    ),
    (
        "extract_placeholder_checkpoint",
        [
            "data/extract_speech_tokens.py",
            "--manifest",
            "{one}",
            "--output",
            "{missing}_codes",
            "--checkpoint",
            "/path/Voila-Tokenizer",
        ],
        ["--checkpoint", "/path/Voila-Tokenizer"],
    ),
    (
        "extract_empty",
        [
            "data/extract_speech_tokens.py",
            "--manifest",
            "{empty}",
            "--output",
            "{missing}_codes",
            "--checkpoint",
            "/path/Voila-Tokenizer",
        ],
        ["{empty}", "清單沒有任何列"],
    ),
    ("download_unknown", ["data/download.py", "--names", "aishel1", "--dry_run"], ["aishell1"]),
    (
        "download_missing_local",
        ["data/download.py", "--local", "aishell1={missing}", "--output_dir", "{missing}_raw"],
        ["--local aishell1={missing}"],
    ),
    (
        "demo_corpus_bad_scale",
        ["data/make_demo_corpus.py", "--output_dir", "{missing}_demo", "--scale", "0"],
        ["--scale"],
    ),
    (
        "prepare_demo_placeholder",
        ["data/prepare_demo_speech.py", "--checkpoint", "/path/Voila-Tokenizer"],
        ["--checkpoint", "/path/Voila-Tokenizer"],
    ),
    (
        "tpu_empty_zone",
        ["launch/tpu/tpu_vm.py", "create", "--name", "x", "--zone", "", "--dry-run"],
        ["--zone"],
    ),
]


def _fill(items: list[str], files: dict[str, Path]) -> list[str]:
    return [s.format(**{k: str(v) for k, v in files.items()}) for s in items]


def _run(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPEAKLLM_DEBUG"}
    env.update({"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **(env_extra or {})})
    return subprocess.run(
        [PY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    files = _files(tmp_path_factory.mktemp("cli_errors"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, _fill(args, files)) for name, args, _ in CASES}
        return {name: (fut.result(), files) for name, fut in futures.items()}


@pytest.mark.parametrize(("name", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line(
    results: dict[str, tuple], name: str, args: list[str], expected: list[str]
) -> None:
    proc, files = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("錯誤：")
    for text in _fill(expected, files):
        assert text in lines[0], (text, lines[0])
    if name.startswith("client"):
        assert not files["reply"].exists()  # 錯誤時不寫回覆檔


def test_debug_shows_traceback(tmp_path: Path) -> None:
    for extra, args in (
        ({"SPEAKLLM_DEBUG": "1"}, ["launch/train.py", "--config", "phase9"]),
        ({"SPEAKLLM_DEBUG": "0"}, ["launch/train.py", "--config", "phase9", "--debug"]),
    ):
        proc = _run(args, extra)
        assert proc.returncode == 2
        assert "Traceback" in proc.stderr and "UserFileError" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("錯誤：--config phase9")


def test_cli_helpers_do_not_import_jax() -> None:
    # 客戶端、錯誤處理、設定解析與入口的執行環境設定不匯入 JAX／Flax；之後匯入 Flax 時立即分片
    # 仍是關閉的。
    code = (
        "import sys, export.serving.client, speakllm_jax.cli, speakllm_jax.audio.io\n"
        "from speakllm_jax.config import load_config\n"
        "from speakllm_jax.cpu_simulation import configure_cpu_simulation\n"
        "load_config('phase2', ['--config.train.steps=3'])\n"
        "configure_cpu_simulation()\n"
        "print(sorted(m for m in ('jax', 'flax', 'torch') if m in sys.modules))\n"
        "from flax import nnx\n"
        "print(nnx.using_eager_sharding())\n"
    )
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "False"]
