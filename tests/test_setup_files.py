"""安裝途徑不漂移：conda 環境檔與兩個 Dockerfile 安裝的 Python 套件正是 requirements.txt 的套件，
只允許平台替換（torch 的 CUDA／CPU 建置、jax 的 [tpu] extra，版本與釘選相同）；預設輸出資料夾
不進 git；.env.example 列出 HF_TOKEN 且沒有填值。"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "serving-gpu": REPO / "launch/docker/serving-gpu.Dockerfile",
    "train-tpu": REPO / "launch/docker/train-tpu.Dockerfile",
}
# pip 的選項中需要一個值的那些（值不是套件）。
PIP_VALUE_OPTS = {"--index-url", "-i", "--extra-index-url", "-f", "--find-links", "-c"}


def requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (REPO / "requirements.txt").read_text("utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            reqs[canonicalize_name(r.name)] = r
    return reqs


def pip_installs(args: list[str]) -> tuple[list[str], list[Requirement], list[str]]:
    """解析一個 `pip install` 的參數：回傳 (-r 檔案, 套件, 套件庫網址)。"""
    files, pkgs, indexes = [], [], []
    it = iter(args)
    for a in it:
        if a in ("-r", "--requirement"):
            files.append(next(it))
        elif a in PIP_VALUE_OPTS:
            value = next(it)
            if a in ("--index-url", "-i", "--extra-index-url"):
                indexes.append(value)
        elif not a.startswith("-"):
            pkgs.append(Requirement(a))
    return files, pkgs, indexes


def dockerfile_pip(path: Path) -> tuple[list[str], list[Requirement], list[str]]:
    """Dockerfile 中所有 RUN 的 `pip install`（續行併起、以 && 分段）。"""
    text = re.sub(r"\\\n", " ", path.read_text("utf-8"))
    files, pkgs, indexes = [], [], []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for part in line[4:].split("&&"):
            words = shlex.split(part)
            for k in range(len(words) - 1):
                if words[k] == "pip" and words[k + 1] == "install":
                    f, p, i = pip_installs(words[k + 2 :])
                    files += f
                    pkgs += p
                    indexes += i
    return files, pkgs, indexes


def assert_swaps_only(pkgs: list[Requirement], allowed: dict[str, set[str]]) -> None:
    """每個額外安裝的套件都是 requirements.txt 中的同一套件、同一版本限制，只差允許的 extra。"""
    reqs = requirements()
    for r in pkgs:
        name = canonicalize_name(r.name)
        assert name in allowed, f"{r} 不是允許的平台替換（只能 {sorted(allowed)}）"
        assert name in reqs, f"{r} 不在 requirements.txt"
        assert str(r.specifier) == str(reqs[name].specifier), f"{r} 的版本與 requirements.txt 不同"
        assert r.extras <= allowed[name], r


def test_requirements_parse():
    reqs = requirements()
    assert {"jax", "torch", "python-dotenv", "grpcio"} <= set(reqs)
    assert str(reqs["torch"].specifier) == "==2.13.0"


def test_environment_yml_installs_requirements():
    env = yaml.safe_load((REPO / "environment.yml").read_text("utf-8"))
    assert env["name"] == "voice-duplex-zh"
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_sections == [["-r requirements.txt"]]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    names = {canonicalize_name(re.split(r"[=<>]", d)[0]) for d in conda}
    # conda 只給 Python 與系統工具，不重複任何 PyPI 套件。
    assert not names & set(requirements()), names & set(requirements())
    assert {"python", "pip", "espeak-ng"} <= names
    py = next(d for d in conda if d.startswith("python="))
    assert py.split("=")[1] == "3.11"  # 與 pyproject 的 requires-python、ruff 目標一致


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_installs_requirements(image):
    path = DOCKERFILES[image]
    text = path.read_text("utf-8")
    files, pkgs, indexes = dockerfile_pip(path)
    assert files == ["requirements.txt"]
    assert "COPY requirements.txt" in text
    if image == "serving-gpu":
        assert_swaps_only(pkgs, {"torch": set()})
        assert [canonicalize_name(r.name) for r in pkgs] == ["torch"]
        assert any("download.pytorch.org/whl/${TORCH_CUDA}" in i for i in indexes)
        assert re.search(r"ARG TORCH_CUDA=cu\d+", text)
        assert re.search(r"FROM \$\{CUDA_IMAGE\}", text) and "nvidia/cuda:" in text
        assert 'ENTRYPOINT ["python", "-m", "export.serving.server"' in text
    else:
        assert_swaps_only(pkgs, {"torch": set(), "jax": {"tpu"}})
        assert {(canonicalize_name(r.name), tuple(r.extras)) for r in pkgs} == {
            ("torch", ()),
            ("jax", ("tpu",)),
        }
        assert 'ENTRYPOINT ["python", "launch/train.py"]' in text


def test_tfds_env_pins_only_its_extras():
    """tfds 指令環境（launch/setup_tfds.sh）沿用主環境，只釘選另加的套件；唯一與主環境重疊的是
    protobuf，而且必須落在主環境範圍之外（Beam 的 <7），否則這些套件該直接進 requirements.txt。"""
    extra = {}
    for line in (REPO / "requirements-tfds.txt").read_text("utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            extra[canonicalize_name(r.name)] = r
    assert {"tensorflow-cpu", "apache-beam", "mlcroissant"} <= set(extra)
    assert all(str(r.specifier).startswith("==") for r in extra.values()), extra
    main = requirements()
    assert set(extra) & set(main) == {"protobuf"}
    pinned = str(extra["protobuf"].specifier)[2:]
    assert not main["protobuf"].specifier.contains(pinned)
    script = (REPO / "launch/setup_tfds.sh").read_text("utf-8")
    assert "--system-site-packages" in script and "-r requirements-tfds.txt" in script


def test_swap_check_catches_drift():
    with pytest.raises(AssertionError, match="版本"):
        assert_swaps_only([Requirement("torch==2.12.0")], {"torch": set()})
    with pytest.raises(AssertionError, match="平台替換"):
        assert_swaps_only([Requirement("numpy")], {"torch": set()})


def test_env_example_lists_hf_token_without_value():
    lines = (REPO / ".env.example").read_text("utf-8").splitlines()
    assert "HF_TOKEN=" in lines
    assert all(not re.match(r"^[A-Z_]+=.+", s) for s in lines)  # 範本不帶任何值


@pytest.mark.parametrize(
    "path",
    [
        "runs/phase2_duplex/config.json",
        "exported/phase2_duplex/parity.json",
        "manifests/demo.jsonl",
        "resampled/manifest.jsonl",
        "codes/meta.json",
        "demo_corpus/demo_info.json",
        "demo_assets/model/config.json",
        "reply_zh.wav",
        "server.log",
        ".env",
        ".venv-tfds/bin/tfds",
    ],
)
def test_default_outputs_are_ignored(path):
    res = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert res.returncode == 0, f"{path} 應列在 .gitignore"


def test_shipped_files_are_not_ignored():
    for path in ("examples/question_zh.wav", ".env.example", "speakllm_jax/data/manifest.py"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert res.returncode == 1, f"{path} 不該被忽略"
