"""TPU VM 腳本：`--dry-run` 印出格式正確的 gcloud 指令且不執行任何東西；
沒有 gcloud 時實際執行會清楚地失敗；有 gcloud 時依序執行與 dry-run 相同的指令。"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "launch" / "tpu" / "tpu_vm.py"
BASE = ["--name", "speak-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-64"]
BASE += ["--version", "v2-alpha-tpuv5"]
TRAIN = [
    "--config",
    "phase0",
    "--config.preset=full",
    "--workdir",
    "gs://my-bucket/runs/p0",
    "--config.optim.lr=3e-4",
    "--config.data.train_manifests=/data/a b.jsonl,/data/c'd.jsonl",
]


def _cli(*args: str, path: str = "", cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path)
    return subprocess.run(
        [sys.executable, str(CLI), *args], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture
def fake_gcloud(tmp_path: Path) -> tuple[Path, Path]:
    """會記錄自己被呼叫的 gcloud（排隊資源查詢時回答 ACTIVE）。"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    script = bindir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'describe' in sys.argv: print('ACTIVE')\n"
    )
    script.chmod(0o755)
    return bindir, log


def _lines(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return [shlex.split(ln) for ln in lines]


def _flag(argv: list[str], name: str) -> str:
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


def test_dry_run_all_is_well_formed_and_executes_nothing(fake_gcloud) -> None:
    bindir, log = fake_gcloud
    proc = _cli("all", *BASE, "--dry-run", "--", *TRAIN, path=str(bindir))
    assert proc.returncode == 0, proc.stderr
    assert not log.exists(), "dry-run 不應呼叫 gcloud"
    cmds = _lines(proc.stdout)
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    for c in cmds:
        assert _flag(c, "--zone") == "us-east5-a"
        assert any(a == "speak-v5p" or a.startswith("speak-v5p:") for a in c[5:7])
    create, scp, setup, train, logs = cmds
    assert _flag(create, "--accelerator-type") == "v5p-64"
    assert _flag(create, "--version") == "v2-alpha-tpuv5"
    assert "--spot" not in create
    assert "--worker=all" in scp and "--recurse" in scp
    assert scp[5:7] == [str(REPO), "speak-v5p:~/"]
    assert "--worker=all" in setup and "--worker=all" in train
    assert "bash launch/setup.sh" in _flag(setup, "--command")
    assert _flag(logs, "--worker") == "0"

    # 遠端指令由 shell 再解析一次：訓練參數（含空白與單引號）必須原樣回到 train.py。
    remote = shlex.split(_flag(train, "--command"))
    i = remote.index("launch/train.py")
    assert remote[i - 1] == "python" and remote[i - 2] == "nohup"
    got = remote[i + 1 : i + 1 + len(TRAIN)]
    assert got == TRAIN
    assert "--no_progress" in remote
    assert "TPU_WORKER_HOSTNAMES=$(curl" in _flag(train, "--command")


def test_dry_run_queued_spot_and_delete(fake_gcloud) -> None:
    bindir, log = fake_gcloud
    proc = _cli("create", *BASE, "--queued", "--spot", "--project", "p1", "--dry-run", path="")
    assert proc.returncode == 0, proc.stderr
    create, wait = _lines(proc.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert _flag(create, "--node-id") == "speak-v5p"
    assert _flag(create, "--project") == "p1" and "--spot" in create
    assert wait[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]

    proc = _cli("delete", *BASE, "--queued", "--dry-run", path=str(bindir))
    (delete,) = _lines(proc.stdout)
    assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
    assert "--quiet" in delete and "--force" in delete
    proc = _cli("delete", *BASE, "--dry-run", path=str(bindir))
    (delete,) = _lines(proc.stdout)
    assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]
    assert not log.exists()


def test_without_gcloud_real_run_fails_clearly() -> None:
    proc = _cli("delete", *BASE, path="")
    assert proc.returncode == 2
    assert "gcloud" in proc.stderr and "--dry-run" in proc.stderr


def test_train_without_args_and_bad_values_are_errors() -> None:
    proc = _cli("train", *BASE, "--dry-run", path="")
    assert proc.returncode != 0 and "launch/train.py" in proc.stderr
    proc = _cli("create", "--name", "x", "--zone", "", "--dry-run", path="")
    assert proc.returncode != 0 and "--zone" in proc.stderr
    proc = _cli("explode", *BASE, "--dry-run", path="")
    assert proc.returncode != 0


def test_real_run_calls_gcloud_with_the_dry_run_commands(fake_gcloud) -> None:
    bindir, log = fake_gcloud
    args = ["all", *BASE, "--queued", "--delete-after"]
    dry = _cli(*args, "--dry-run", "--", *TRAIN, path=str(bindir))
    assert not log.exists()
    real = _cli(*args, "--", *TRAIN, path=str(bindir))
    assert real.returncode == 0, real.stderr
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [["gcloud", *c] for c in calls] == _lines(dry.stdout)
    assert calls[-1][:4] == ["compute", "tpus", "queued-resources", "delete"]


def test_run_sh_wrapper_matches_python_cli() -> None:
    args = ["train", *BASE, "--dry-run", "--", *TRAIN]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    sh = subprocess.run(
        ["bash", str(REPO / "launch" / "tpu" / "run.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert sh.returncode == 0, sh.stderr
    assert sh.stdout == _cli(*args, path="").stdout
