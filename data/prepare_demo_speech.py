"""準備示範語料的全雙工訓練資料：語音指令排成雙聲道對話、建立示範 Voila-Tokenizer、抽助理聲道語音碼。

python data/prepare_demo_speech.py [--demo_dir demo_corpus] [--checkpoint DIR] [--tokenizer voila]

沒給 `--checkpoint` 時寫出一個小型隨機的示範 Voila-Tokenizer（官方 `EncodecModel` 格式）；
真實訓練請給 maitrix-org/Voila-Tokenizer 的本機資料夾。`--tokenizer cosyvoice2` 改抽 CosyVoice2
（S3Tokenizer v2，25 Hz、碼本 6561）碼到 `duplex/codes_cosyvoice2_*`，示範模型為小型隨機的
s3tokenizer 版面 `speech_tokenizer_v2.pt`。訓練程序在缺少語音碼時會以子程序呼叫本腳本
（JAX 訓練路徑不匯入 PyTorch）。
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.tokenizers.extract import prepare_demo_speech  # noqa: E402
from speakllm_jax.cli import ArgumentParser, print_summary, require_dir, run_cli  # noqa: E402
from speakllm_jax.data.demo_data import DEMO_SPEECH_TOKENIZERS  # noqa: E402

LABELS = {
    "dialogue": "對話清單",
    "instructions": "語音指令對話清單",
    "dialogue_codes": "對話語音碼",
    "instructions_codes": "語音指令語音碼",
    "tokenizer": "示範語音符號抽取器",
}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--demo_dir", default="", help="示範語料資料夾（預設 demo_corpus/ 或 $SPEAKLLM_DEMO_DIR）"
    )
    p.add_argument(
        "--checkpoint", default="", help="語音符號抽取器的資料夾；空白則用示範用隨機模型"
    )
    p.add_argument(
        "--tokenizer", default="voila", choices=DEMO_SPEECH_TOKENIZERS, help="語音符號種類"
    )
    p.add_argument("--no_next", action="store_true", help="不印下一步指令（由訓練程序呼叫時）")
    a = p.parse_args(argv)
    if a.checkpoint:
        require_dir(
            a.checkpoint, "--checkpoint", "需要本機的語音符號抽取器資料夾；空白則用示範模型"
        )
    out = prepare_demo_speech(a.demo_dir or None, a.checkpoint or None, a.tokenizer)
    written = [(LABELS.get(name, name), path) for name, path in out.items()]
    if a.checkpoint:
        written = [(label, path) for label, path in written if label != LABELS["tokenizer"]]
        written.append(("語音符號抽取器", a.checkpoint))
    print_summary(
        f"示範全雙工資料已就緒（{a.tokenizer}）",
        written,
        [] if a.no_next else ["python launch/train.py --config phase2"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
