"""準備示範語料的全雙工訓練資料：語音指令排成雙聲道對話、建立示範 Voila-Tokenizer、抽助理聲道語音碼。

python data/prepare_demo_speech.py [--demo_dir demo_corpus] [--checkpoint DIR] [--tokenizer voila]

沒給 `--checkpoint` 時寫出一個小型隨機的示範 Voila-Tokenizer（官方 `EncodecModel` 格式）；
真實訓練請給 maitrix-org/Voila-Tokenizer 的本機資料夾。`--tokenizer cosyvoice2` 改抽 CosyVoice2
（S3Tokenizer v2，25 Hz、碼本 6561）碼到 `duplex/codes_cosyvoice2_*`，示範模型為小型隨機的
s3tokenizer 版面 `speech_tokenizer_v2.pt`。訓練程序在缺少語音碼時會以子程序呼叫本腳本
（JAX 訓練路徑不匯入 PyTorch）。
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speakllm_jax.data.demo_data import DEMO_SPEECH_TOKENIZERS, prepare_demo_speech  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--demo_dir", default="", help="示範語料資料夾（預設 demo_corpus/ 或 $SPEAKLLM_DEMO_DIR）"
    )
    p.add_argument(
        "--checkpoint", default="", help="語音符號抽取器的資料夾；空白則用示範用隨機模型"
    )
    p.add_argument(
        "--tokenizer", default="voila", choices=DEMO_SPEECH_TOKENIZERS, help="語音符號種類"
    )
    a = p.parse_args(argv)
    out = prepare_demo_speech(a.demo_dir or None, a.checkpoint or None, a.tokenizer)
    for name, path in out.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
