"""各層共用的類別標籤與特殊編號：輪替動作、情緒、交錯序列的符號種類、忽略目標。

純 Python（不匯入 jax、numpy 或 torch），位於層級最底層：文字、音訊、資料、模型、訓練、
評估、匯出與服務端都從這裡取用，不再各自寫數字。
"""

from __future__ import annotations

import enum


class TurnAction(enum.IntEnum):
    """輪替頭的類別（助理的觀點）。"""

    LISTEN = 0
    SPEAK = 1
    CONTINUE = 2
    YIELD = 3
    BACKCHANNEL = 4


NUM_TURN_ACTIONS = len(TurnAction)
# 助理出聲的動作：這些幀輸出語音碼。
SPEAKING_ACTIONS: tuple[int, ...] = (
    int(TurnAction.SPEAK),
    int(TurnAction.CONTINUE),
    int(TurnAction.BACKCHANNEL),
)

# 聲調類別數：0 無聲調／非漢字、1–4 四聲、5 輕聲。
NUM_TONES = 6

# 情緒類別（情緒頭的輸出順序、`<|emo_*|>` 特殊符號的順序）。
EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "surprised")
NUM_EMOTIONS = len(EMOTIONS)


def emotion_token(emotion: str) -> str:
    """情緒標籤的特殊符號字串，例如 `<|emo_happy|>`。"""
    return f"<|emo_{emotion}|>"


# 損失中表示「不計分」的目標編號。
IGNORE_ID = -1

# CosyVoice2 交錯序列中每個位置的符號種類（決定查哪個嵌入表）。
KIND_TEXT = 0
KIND_SPEECH = 1
KIND_SOS = 2
KIND_TASK = 3
