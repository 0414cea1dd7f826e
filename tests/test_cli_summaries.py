"""CLI 結尾摘要：訓練寫了什麼、下一步指令；重跑已完成的 workdir 印出同樣的摘要。"""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.train import main as train_main
from speakllm_jax.cli import run_cli

TINY = [
    "--config",
    "phase0",
    "--config.train.steps=1",
    "--config.train.batch_size=2",
    "--config.mesh.data=1",
    "--config.data.bucket_frames=(800,)",
    "--config.data.max_text_tokens=24",
    "--no_progress",
]


def _summary(out: str) -> tuple[str, dict[str, str], list[str]]:
    """把摘要拆成（標題, {標籤: 值}, 下一步指令）。"""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(("完成：", "已訓練完成")))
    title, written, nxt = lines[start], {}, []
    for line in lines[start + 1 :]:
        if line.startswith("下一步："):
            nxt.append(line.removeprefix("下一步："))
        elif nxt:
            nxt.append(line.strip())
        else:
            label, value = line.strip().split(maxsplit=1)
            written[label] = value.strip()
    return title, written, nxt


def test_train_summary_and_rerun(demo_dir: Path, tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "run"
    assert run_cli(train_main, [*TINY, "--workdir", str(workdir)]) == 0
    title, written, nxt = _summary(capsys.readouterr().out)
    assert title.startswith("完成：第 1 步")
    assert written["檢查點"] == str(workdir / "checkpoints")
    for label in ("設定", "檢查點", "指標", "損失曲線"):
        assert Path(written[label]).exists(), label
    assert written["TensorBoard"] == f"tensorboard --logdir {workdir / 'tensorboard'}"
    assert nxt[0] == f"python launch/evaluate.py --workdir {workdir}"
    assert nxt[1].startswith(f"python -m export.to_torch --checkpoint {workdir}")

    # 重跑：不再訓練，但印出同樣寫了什麼與下一步，損失由 metrics.jsonl 讀回。
    assert run_cli(train_main, [*TINY, "--workdir", str(workdir)]) == 0
    title2, written2, nxt2 = _summary(capsys.readouterr().out)
    assert title2.startswith("已訓練完成（第 1 步") and "損失" in title2
    assert written2 == written and nxt2 == nxt


@pytest.mark.parametrize("flag", ["--config.train.steps=x", "--config.nope=1"])
def test_run_cli_returns_2_before_training(flag: str, tmp_path: Path, capsys) -> None:
    assert run_cli(train_main, ["--workdir", str(tmp_path / "w"), flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("錯誤：--config.") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()  # 錯誤在寫任何東西之前
