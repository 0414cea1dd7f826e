"""以 espeak-ng 重新產生隨專案附上的範例提問 `examples/question_{zh,en}.wav`（16 kHz 單聲道）。

python data/make_examples.py [--output_dir examples]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.data.demo_corpus import EXAMPLE_QUESTIONS, EXAMPLES_DIR, make_examples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", default=EXAMPLES_DIR, help="輸出資料夾（預設 examples）")
    a = p.parse_args(argv)
    for name, seconds in make_examples(a.output_dir).items():
        print(f"{Path(a.output_dir) / name}：{seconds:.2f} 秒，「{EXAMPLE_QUESTIONS[name][0]}」")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
