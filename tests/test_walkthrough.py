"""README「走一遍」一節的解析（不執行整條路；完整執行在 `.ci/run`）：解析器找到該節每一條指令、
指令引用的檔案存在、執行資料夾名稱與訓練預設一致、CI 的覆寫只加在訓練那一行、任何一行失敗就失敗。"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.walkthrough import (
    BEGIN,
    END,
    OVERRIDE_ENV,
    parse_walkthrough,
    split_comment,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text("utf-8")
TRAIN_VAR = OVERRIDE_ENV["python launch/train.py"]


def section_lines() -> list[str]:
    """另一種讀法：標記之間 ```bash 區塊中所有非空、非整行註解的行（本節不使用續行）。"""
    body = README.split(BEGIN, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [
        s.strip()
        for b in blocks
        for s in b.splitlines()
        if s.strip() and not s.strip().startswith("#")
    ]


def test_parser_finds_every_command_of_the_section():
    cmds = parse_walkthrough(README)
    lines = section_lines()
    assert len(lines) == len(cmds) >= 15
    assert [c.text for c in cmds] == [split_comment(s)[0] for s in lines]
    numbered = README.splitlines()
    for c in cmds:
        assert numbered[c.line - 1].strip().startswith(c.text)


def test_section_covers_the_whole_path():
    texts = [c.text for c in parse_walkthrough(README)]
    heads = [" ".join(shlex.split(t)[:3]) for t in texts if t.startswith("python")]
    want = [
        "python launch/train.py --config",
        "python launch/evaluate.py --workdir",
        "python -m export.to_torch",
        "python -m export.serving.server",
        "python -m export.serving.client",
        "python -m export.serving.client",
        "python data/make_demo_corpus.py --output_dir",
        "python data/download.py --config",
        "python data/build_manifests.py --config",
        "python data/normalize_text_zh.py --manifest",
        "python data/resample_split.py --manifest",
        "python data/extract_speech_tokens.py --tokenizer",
    ]
    assert heads == want
    assert texts[0] == "python launch/train.py --config phase2"  # 主要工作，使用者照打的那一行
    assert any(t.startswith("kill ") for t in texts)
    server = next(t for t in texts if "export.serving.server" in t)
    assert server.endswith("&")
    # 伺服器停掉之前，兩個客戶端都已經跑完。
    kill = next(i for i, t in enumerate(texts) if t.startswith("kill "))
    assert all(i < kill for i, t in enumerate(texts) if "serving.client" in t)


def test_run_folders_match_the_training_default():
    from configs.phase2_duplex import get_config
    from speakllm_jax.data.demo_corpus import DEMO_DIR
    from speakllm_jax.data.demo_data import duplex_paths

    run = f"runs/{get_config().phase}"
    section = README.split(BEGIN, 1)[1].split(END, 1)[0]
    assert f"--workdir {run}" in section and f"--checkpoint {run}" in section
    assert not re.search(r"runs/p\d\b", README), "README 不該再用 runs/p0 這類名稱"
    tok = duplex_paths(REPO / DEMO_DIR)["tokenizer"].relative_to(REPO).as_posix()
    assert section.count(f"--checkpoint {tok}") == 1
    assert section.count(f"--config.voila_dir={tok}") == 1
    assert f"--output_dir {DEMO_DIR}" in section and f"demo={DEMO_DIR}" in section


def test_files_named_by_the_section_are_shipped():
    for t in (c.text for c in parse_walkthrough(README)):
        for word in shlex.split(t.rstrip("&")):
            if re.fullmatch(r"(examples|configs)/[\w/.]+", word):
                assert (REPO / word).is_file(), word
    assert "/path/" not in README and "sample.wav" not in README


def test_split_comment_respects_quotes():
    assert split_comment("ls -l  # 列出") == ("ls -l", "列出")
    assert split_comment("echo 'a # b' x") == ("echo 'a # b' x", "")
    assert split_comment('grep -q "#x" f # 註') == ('grep -q "#x" f', "註")
    assert split_comment("echo a#b") == ("echo a#b", "")


def test_overrides_only_on_the_documented_lines():
    env = {TRAIN_VAR: "--config.train.steps=4"}
    assert with_overrides("python launch/train.py --config phase2", env) == (
        "python launch/train.py --config phase2 --config.train.steps=4"
    )
    assert with_overrides("python launch/train.py --config phase2 &", env) == (
        "python launch/train.py --config phase2 --config.train.steps=4 &"
    )
    assert with_overrides("python launch/evaluate.py --workdir r", env) == (
        "python launch/evaluate.py --workdir r"
    )
    eval_var = OVERRIDE_ENV["python launch/evaluate.py"]
    assert with_overrides(
        "python launch/evaluate.py --workdir r", {eval_var: "--max_dialogues 3"}
    ) == ("python launch/evaluate.py --workdir r --max_dialogues 3")
    assert set(OVERRIDE_ENV) == {"python launch/train.py", "python launch/evaluate.py"}
    assert with_overrides("python launch/train.py --config phase2", {}) == (
        "python launch/train.py --config phase2"
    )


def test_parser_rejects_a_readme_without_the_section():
    with pytest.raises(ValueError, match="標記"):
        parse_walkthrough("# 沒有走一遍\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="沒有任何"):
        parse_walkthrough(f"{BEGIN}\n```python\nprint(1)\n```\n{END}\n")


def _readme(tmp_path: Path, lines: list[str]) -> Path:
    body = "\n".join(lines)
    p = tmp_path / "README.md"
    p.write_text(f"# x\n\n```bash\nfalse\n```\n\n{BEGIN}\n```bash\n{body}\n```\n{END}\n", "utf-8")
    return p


def _run(readme: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch/walkthrough.py"), "--readme", str(readme)]
        + ["--cwd", str(cwd)],
        capture_output=True,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **env},
        timeout=60,
    )


def test_runs_the_lines_in_one_shell_and_fails_on_the_first_error(tmp_path):
    ok = _readme(
        tmp_path,
        [
            "X=hello  # 同一個 shell：變數留到下一行",
            "echo $X > out.txt",
            "sleep 30 &",
            "python launch/train.py --config phase2",
        ],
    )
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch/train.py").write_text(
        "import sys; open('args.txt','w').write(' '.join(sys.argv[1:]))"
    )
    res = _run(ok, tmp_path, **{TRAIN_VAR: "--config.train.steps=2"})
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.txt").read_text() == "hello\n"
    assert (tmp_path / "args.txt").read_text() == "--config phase2 --config.train.steps=2"
    assert "走一遍：每步耗時" in res.stdout
    bad = _readme(tmp_path, ["echo one > one.txt", "ls does-not-exist", "echo three > three.txt"])
    res = _run(bad, tmp_path)
    assert res.returncode != 0
    assert (tmp_path / "one.txt").exists() and not (tmp_path / "three.txt").exists()
    assert "錯誤：README 第" in res.stderr and "ls does-not-exist" in res.stderr
