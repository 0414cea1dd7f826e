"""輪替示範對話（對話規模）：以 espeak-ng 合成可教輪替的雙聲道對話，寫到 `output_dir/duplex_dialogues/`。

每段對話（`{id}.wav` 雙聲道：聲道 0 使用者、聲道 1 助理；`{id}.json` 標註）依序是：

- 使用者第一輪，句中一定有一個停頓（0.3–1.0 秒；前面是填充詞「那個…」「嗯…」「uh」，或以逗號
  語調結束的子句——使用者還沒說完）；
- 助理在使用者說完後 120–280 ms 開始回答；回答中使用者附和一聲（嗯／對／好／是喔／uh-huh，
  0.15–0.6 秒，`overlaps` 的 backchannel）；
- 使用者在 0.1–1.2 秒的間隔後說第二輪（一半有句中停頓）；助理在 120–280 ms 後回答，
  使用者在回答的 15–75% 處搶話（`overlaps` 的 barge_in），錄音中的助理 0.16–0.3 秒後停下；
- 助理在搶話結束後 120–280 ms 給出簡短回應。

語言依序輪流 zh、en、mixed（語碼轉換，清單的 `language` 值；輪替報表記為 cs）。使用者與助理的
聲音依切分各自一組（訓練、驗證、測試的聲音互不重疊），每段再加音高、語速的隨機偏移；句子也依
切分互不重疊。標註格式見 `docs/datasets.md`：`turns`、`overlaps` 與列層級的 `pauses`
（`[{start, end, kind: "filler"|"comma", text}]`，使用者句中停頓的靜音區間）。

亂數來源獨立於預設示範語料（`default_rng([seed, 14])`），所以預設語料逐位元不變。
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from speakllm_jax.audio.io import resample
from speakllm_jax.data.demo_corpus import SR, _place, _t, has_espeak, synth, write_dialogue

DIALOGUE_DIR = "duplex_dialogues"
DIALOGUE_INFO = "duplex_info.json"
LANG_CYCLE = ("zh", "en", "mixed")
SPLIT_CYCLE = ("train", "train", "train", "dev", "test")
SPLITS = ("train", "dev", "test")

# 使用者的兩段式句子（停頓插在兩段之間）。每個池最後 4 句保留：倒數 4–3 給 dev，最後 2 給 test。
USER_CLAUSES: dict[str, tuple[tuple[str, str], ...]] = {
    "zh": (
        ("我想問一下", "明天早上的火車幾點出發"),
        ("請幫我查查看", "附近有沒有便宜的餐廳"),
        ("我今天下午", "想去圖書館借幾本書"),
        ("你可以告訴我", "這個週末會不會下雨"),
        ("我上個禮拜", "買的那台電腦好像壞了"),
        ("請你提醒我", "晚上八點要打電話給媽媽"),
        ("我們公司下個月", "要搬到新的辦公室"),
        ("我想知道", "去機場最快的方法是什麼"),
        ("這家店的蛋糕", "是不是每天都會賣完"),
        ("你覺得我應該", "先學鋼琴還是吉他"),
    ),
    "en": (
        ("I was wondering", "if the museum is open on Monday"),
        ("Could you check", "the price of a ticket to Boston"),
        ("My sister and I", "want to cook dinner tonight"),
        ("Can you tell me", "how far the station is from here"),
        ("I think my phone", "stopped charging last night"),
        ("Please remind me", "to water the plants tomorrow"),
        ("Our team needs", "a bigger room for the workshop"),
        ("I would like to know", "when the next bus arrives"),
        ("Do you remember", "the name of that little cafe"),
        ("Should I start", "with the piano or the guitar"),
    ),
    "mixed": (
        ("我等一下要開", "一個很重要的 meeting"),
        ("請幫我把這份", "report 寄給 manager"),
        ("我的 laptop", "今天早上一直當機"),
        ("你可以幫我查", "明天的 flight 有沒有延誤"),
        ("我想下載一個", "學英文的 app"),
        ("這個 project 的", "deadline 可以延後嗎"),
        ("我們晚上用", "Zoom 討論這個 bug"),
        ("請幫我訂一間", "離車站近的 hotel"),
        ("我剛剛收到", "一封很奇怪的 email"),
        ("你推薦哪一個", "online course 學 Python"),
    ),
}
# 助理的長回答（會被搶話的那一輪也從這裡取）與簡短回應。
REPLIES: dict[str, tuple[str, ...]] = {
    "zh": (
        "好的，第一班車是六點十分。",
        "附近有三家小店，走路就到。",
        "週末多雲，降雨機率很低。",
        "先檢查充電線和插座吧。",
        "我們先從最簡單的開始。",
        "我記下來了，到時候提醒你。",
        "搭捷運最快，大約四十分鐘。",
        "吉他比較容易上手一點。",
    ),
    "en": (
        "Sure, the first train leaves at six ten.",
        "There are three nice places within a short walk.",
        "It will be cloudy with a low chance of rain.",
        "First check the cable and the outlet.",
        "Let us start with the simplest way.",
        "I made a note and I will remind you.",
        "The airport express takes about forty minutes.",
        "The guitar is easier to pick up than the piano.",
    ),
    "mixed": (
        "我看一下 calendar，十點後有空。",
        "report 寄出去了，manager 會回你。",
        "你先試試看 restart 吧。",
        "明天的 flight 目前準時。",
        "這個 app 有很多免費課程。",
        "我幫你寫 email 問問看。",
        "有兩間 hotel 離車站很近。",
        "這門 online course 評價很好。",
    ),
}
SHORT_REPLIES: dict[str, tuple[str, ...]] = {
    "zh": (
        "好的，沒問題。",
        "了解，我改一下。",
        "可以，我再查查。",
        "好，那就這樣。",
        "沒關係，你說。",
    ),
    "en": (
        "Sure, no problem.",
        "Got it, I will change that.",
        "Okay, let me check.",
        "Fine.",
        "Go ahead.",
    ),
    "mixed": (
        "好的，我改 schedule。",
        "OK，我再查一下。",
        "沒問題，我 update 一下。",
        "好，你說。",
        "OK，了解。",
    ),
}
BARGE_INS: dict[str, tuple[str, ...]] = {
    "zh": (
        "等一下，我改主意了。",
        "不用了，謝謝你。",
        "那後天呢？",
        "先不要，我再想想。",
        "等等，換一個。",
    ),
    "en": (
        "Wait, I changed my mind.",
        "No thanks, that is fine.",
        "What about Friday?",
        "Hold on.",
        "Stop, not that one.",
    ),
    "mixed": (
        "等一下，那 Friday 呢？",
        "不用了，thanks。",
        "先 hold 一下。",
        "等等，換一個 plan。",
        "Sorry，我改一下。",
    ),
}
FILLERS: dict[str, tuple[str, ...]] = {
    "zh": ("那個", "嗯"),
    "en": ("uh", "um"),
    "mixed": ("那個", "uh"),
}
BACKCHANNEL_WORDS: dict[str, tuple[str, ...]] = {
    "zh": ("嗯", "對", "好", "是喔"),
    "en": ("uh-huh", "yeah", "okay"),
    "mixed": ("嗯", "對", "uh-huh", "okay"),
}
# 聲音 (espeak 聲音, 音高, 語速)，依切分互不重疊；英文句子自動改用同變體的 en-us 聲音。
USER_VOICES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "train": (("cmn+f3", 70, 205), ("cmn+m3", 40, 215), ("cmn+f2", 60, 195), ("cmn+m1", 45, 220)),
    "dev": (("cmn+f4", 75, 205),),
    "test": (("cmn+m2", 50, 200), ("cmn+f1", 65, 215)),
}
ASSISTANT_VOICES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "train": (("cmn", 45, 225), ("cmn+f5", 55, 220)),
    "dev": (("cmn+m4", 50, 230),),
    "test": (("cmn+m5", 50, 230),),
}
PITCH_JITTER = 8
SPEED_JITTER = 15
# 時間範圍（秒）。
RESPONSE_GAP_S = (0.12, 0.28)
USER_GAP_S = (0.1, 1.2)
PAUSE_S = (0.3, 1.0)
BACKCHANNEL_S = (0.15, 0.6)
BARGE_POINT = (0.15, 0.75)
BARGE_REACTION_S = (0.16, 0.3)


def split_pool(pool: tuple, split: str) -> tuple:
    """依切分取句子池的一段：最後 2 個給 test、倒數 4–3 給 dev，其餘給 train。"""
    if split == "test":
        return pool[-2:]
    if split == "dev":
        return pool[-4:-2]
    return pool[:-4]


def _choice(rng: np.random.Generator, items: tuple) -> Any:
    return items[int(rng.integers(len(items)))]


def _jitter(rng: np.random.Generator, voice: tuple[str, int, int]) -> tuple[str, int, int]:
    name, pitch, speed = voice
    p = int(np.clip(pitch + rng.integers(-PITCH_JITTER, PITCH_JITTER + 1), 0, 99))
    s = int(max(80, speed + rng.integers(-SPEED_JITTER, SPEED_JITTER + 1)))
    return name, p, s


def _backchannel(rng: np.random.Generator, word: str, voice: tuple[str, int, int]) -> np.ndarray:
    """長度 0.15–0.6 秒的附和：先調 espeak 語速逼近目標長度，仍超出範圍時重取樣到範圍內。"""
    target = rng.uniform(*BACKCHANNEL_S)
    w = synth(word, *voice)
    name, pitch, speed = voice
    speed2 = int(np.clip(speed * (len(w) / SR) / target, 80, 450))
    w = synth(word, name, pitch, speed2)
    lo, hi = (int(SR * x) for x in BACKCHANNEL_S)
    if not lo <= len(w) <= hi:
        w = resample(w, len(w), int(np.clip(len(w), lo + 1, hi - 1)))
    return np.ascontiguousarray(w, np.float32)


class _Builder:
    """一段對話的兩條聲道與標註。"""

    def __init__(self) -> None:
        self.user = np.zeros(SR * 4, np.float32)
        self.asst = np.zeros(SR * 4, np.float32)
        self.turns: list[dict[str, Any]] = []
        self.overlaps: list[dict[str, Any]] = []
        self.pauses: list[dict[str, Any]] = []

    def put(self, role: str, wave: np.ndarray, start: int, text: str, kind: str) -> int:
        if role == "user":
            self.user = _place(self.user, wave, start)
        else:
            self.asst = _place(self.asst, wave, start)
        end = start + len(wave)
        self.turns.append(
            {"speaker": role, "start": _t(start), "end": _t(end), "text": text, "kind": kind}
        )
        return end


def _user_turn(
    rng: np.random.Generator,
    lang: str,
    clause: tuple[str, str],
    voice: tuple[str, int, int],
    with_pause: bool,
) -> tuple[np.ndarray, str, dict[str, Any] | None]:
    """使用者一輪（可含一個句中停頓）；回傳（波形, 文字, 停頓標註〔相對本輪起點的樣本〕）。"""
    part1, part2 = clause
    sep = "" if lang != "en" else " "
    if not with_pause:
        text = f"{part1}{sep}{part2}"
        return synth(text, *voice), text, None
    if rng.random() < 0.5:
        filler = _choice(rng, FILLERS[lang])
        w1 = synth(part1, *voice)
        wf = synth(filler, *voice)
        gap = np.zeros(int(SR * 0.06), np.float32)
        head = np.concatenate([w1, gap, wf])
        kind, mark, text_mid = "filler", filler, f"{sep}{filler}…{sep}"
    else:
        comma = "," if lang == "en" else "，"
        head = synth(part1 + comma, *voice)
        kind, mark, text_mid = "comma", comma, f"{comma}{sep}"
    pause = int(SR * rng.uniform(*PAUSE_S))
    w2 = synth(part2, *voice)
    wave = np.concatenate([head, np.zeros(pause, np.float32), w2])
    ann = {"start": len(head), "end": len(head) + pause, "kind": kind, "text": mark}
    return wave, f"{part1}{text_mid}{part2}", ann


def make_turn_dialogue(
    rng: np.random.Generator, lang: str, split: str, compact: bool = False
) -> dict[str, Any]:
    """一段輪替示範對話：回傳 {wave [2, T], turns, overlaps, pauses, duration, language, ...}。

    `compact=True` 只有一個交換：使用者（含停頓）→ 助理回答（中間先附和、後搶話）→ 簡短回應，
    約一半長，供快速的端到端測試。
    """
    uvoice = _jitter(rng, _choice(rng, USER_VOICES[split]))
    avoice = _jitter(rng, _choice(rng, ASSISTANT_VOICES[split]))
    clauses = split_pool(USER_CLAUSES[lang], split)
    replies = split_pool(REPLIES[lang], split)
    c1, c2 = (clauses[i] for i in rng.choice(len(clauses), 2, replace=False))
    r1, r2 = (replies[i] for i in rng.choice(len(replies), 2, replace=False))
    short = _choice(rng, split_pool(SHORT_REPLIES[lang], split))
    barge_txt = _choice(rng, split_pool(BARGE_INS[lang], split))
    b = _Builder()

    def gap(rng_range: tuple[float, float]) -> int:
        return int(SR * rng.uniform(*rng_range))

    def user_turn(clause: tuple[str, str], start: int, with_pause: bool) -> int:
        wave, text, pause = _user_turn(rng, lang, clause, uvoice, with_pause)
        end = b.put("user", wave, start, text, "utterance")
        if pause is not None:
            b.pauses.append(
                dict(pause, start=_t(start + pause["start"]), end=_t(start + pause["end"]))
            )
        return end

    def backchannel(a_start: int, a_len: int, frac: tuple[float, float]) -> None:
        word = _choice(rng, BACKCHANNEL_WORDS[lang])
        wave = _backchannel(rng, word, uvoice)
        bc_start = a_start + int(a_len * rng.uniform(*frac))
        bc_end = b.put("user", wave, bc_start, word, "backchannel")
        b.overlaps.append(
            {
                "start": _t(bc_start),
                "end": _t(min(bc_end, a_start + a_len)),
                "kind": "backchannel",
                "by": "user",
                "onset": _t(bc_start),
            }
        )

    def barge_into(a: np.ndarray, a_start: int, text: str, frac: tuple[float, float]) -> int:
        """使用者在助理回答的 `frac` 處搶話，錄音中的助理反應後淡出停下；回傳搶話結束。"""
        barge = a_start + int(len(a) * rng.uniform(*frac))
        stop = barge + gap(BARGE_REACTION_S)
        cut = a[: stop - a_start].copy()
        fade = min(len(cut), int(SR * 0.02))
        cut[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        b.put("assistant", cut, a_start, text, "interrupted")
        b.overlaps.append(
            {
                "start": _t(barge),
                "end": _t(stop),
                "kind": "barge_in",
                "by": "user",
                "onset": _t(barge),
            }
        )
        return b.put("user", synth(barge_txt, *uvoice), barge, barge_txt, "utterance")

    # 第一輪：使用者（含停頓）→ 助理回答，回答中使用者附和。
    u1_end = user_turn(c1, gap((0.3, 0.6)), True)
    a1 = synth(r1, *avoice)
    a1_start = u1_end + gap(RESPONSE_GAP_S)
    if compact:
        # 精簡版：同一個回答裡先附和、後搶話。
        backchannel(a1_start, len(a1), (0.2, 0.35))
        b_end = barge_into(a1, a1_start, r1, (0.55, 0.8))
    else:
        a1_end = b.put("assistant", a1, a1_start, r1, "utterance")
        backchannel(a1_start, len(a1), (0.3, 0.6))
        # 第二輪：使用者在間隔後再說 → 助理回答，使用者中途搶話。
        u2_end = user_turn(c2, a1_end + gap(USER_GAP_S), bool(rng.random() < 0.5))
        a2 = synth(r2, *avoice)
        b_end = barge_into(a2, u2_end + gap(RESPONSE_GAP_S), r2, BARGE_POINT)
    a3 = synth(short, *avoice)
    a3_end = b.put("assistant", a3, b_end + gap(RESPONSE_GAP_S), short, "utterance")
    total = a3_end + int(SR * 0.5)
    stereo = np.zeros((2, total), np.float32)
    stereo[0, : min(total, len(b.user))] = b.user[:total]
    stereo[1, : min(total, len(b.asst))] = b.asst[:total]
    stereo += rng.normal(0, 3e-4, stereo.shape).astype(np.float32)
    b.turns.sort(key=lambda x: (x["start"], x["speaker"]))
    return {
        "wave": stereo,
        "turns": b.turns,
        "overlaps": b.overlaps,
        "pauses": b.pauses,
        "duration": _t(total),
        "language": lang,
        "split": split,
        "speaker": f"{uvoice[0]}|{avoice[0]}",
        "voices": {"user": list(uvoice), "assistant": list(avoice)},
    }


def make_turn_dialogues(
    output_dir: str | Path, n: int, seed: int = 0, compact: bool = False
) -> dict[str, Any]:
    """在 `output_dir/duplex_dialogues/` 建立 n 段輪替示範對話；回傳並寫出
    `output_dir/duplex_info.json`（{n, seed, splits, languages}）。

    語言依序 zh、en、mixed；切分依序 train、train、train、dev、test。同一種子產出相同檔案。
    `compact` 見 `make_turn_dialogue`。
    """
    if not has_espeak():
        raise RuntimeError("找不到 espeak-ng；示範對話需要它（Debian 套件 espeak-ng）")
    if n < 1:
        raise ValueError(f"dialogues 必須 >= 1，收到 {n}")
    d = Path(output_dir) / DIALOGUE_DIR
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 14])
    splits: dict[str, int] = {}
    langs: dict[str, int] = {}
    for i in range(int(n)):
        lang = LANG_CYCLE[i % len(LANG_CYCLE)]
        split = SPLIT_CYCLE[i % len(SPLIT_CYCLE)]
        did = f"fdx{i:04d}"
        dia = make_turn_dialogue(rng, lang, split, compact)
        write_dialogue(d, did, dia)
        splits[split] = splits.get(split, 0) + 1
        langs[lang] = langs.get(lang, 0) + 1
    info = {
        "n": int(n),
        "seed": int(seed),
        "compact": bool(compact),
        "splits": splits,
        "languages": langs,
    }
    (d.parent / DIALOGUE_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=1), "utf-8")
    return info
