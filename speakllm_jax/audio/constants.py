"""音訊與幀格的常數（唯一的一份；純 Python，服務端、資料、模型與匯出共用）。

模型的輸入音訊為 16 kHz 單聲道；Whisper 的對數梅爾以 hop 160（10 ms）得 100 Hz 梅爾框；
LLM 以 25 Hz（40 ms、640 個樣本）的幀前進，與 Voila-Tokenizer 及 CosyVoice2 語音碼的幀率相同，
所以一幀 = 4 個梅爾框。
"""

from __future__ import annotations

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MEL_RATE = SAMPLE_RATE // HOP_LENGTH  # 100 Hz
FRAME_RATE = 25
FRAME_SAMPLES = SAMPLE_RATE // FRAME_RATE  # 640
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE  # 0.04
MELS_PER_FRAME = MEL_RATE // FRAME_RATE  # 4
