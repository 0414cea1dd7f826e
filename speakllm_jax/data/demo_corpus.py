"""內建示範語料：以 espeak-ng 合成真實語音，寫成各真實語料的原始目錄格式。

產出（皆在 `output_dir` 之下）：
    aishell/data_aishell/wav/{train,dev,test}/S0002/BAC009S0002W0122.wav   AISHELL-1 格式
    aishell/data_aishell/transcript/aishell_transcript_v0.8.txt            以空白分隔的簡體轉寫
    commonvoice/cv-corpus-0.0-demo/{zh-TW,en}/{train,dev,test,validated}.tsv + clips/*.mp3
    dialogues/{id}.wav（雙聲道：聲道 0 使用者、聲道 1 助理） + dialogues/{id}.json（turns、overlaps）
    instructions/instructions.jsonl + instructions/audio/*.wav                語音指令 SFT 配對
    vad/{id}.wav + vad/vad_truth.json                                         已知長度靜音的 VAD 標準答案
    demo_info.json                                                            種子、規模與各部分數量

同一個種子產出逐位元相同的檔案：句子由固定清單依種子抽選，espeak-ng 的輸出是決定性的。
清單（manifest）不在這裡寫，而是由 `data/build_manifests.py` 的轉接器從這些目錄產生。
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.io import resample, write_audio
from speakllm_jax.cli import UserError, UserValueError
from speakllm_jax.text.codeswitch import language_of
from speakllm_jax.text.normalize import normalize_zh

# 示範語料的預設資料夾（相對於專案根目錄）；訓練預設、資料設定 configs/data/demo.py 與
# data/make_demo_corpus.py 都用這一個名稱。
DEMO_DIR = "demo_corpus"
SR = SAMPLE_RATE
CV_SR = 48000
CV_VERSION = "cv-corpus-0.0-demo"

# 中文句子：部分以繁體書寫，含數字與全形標點。
ZH_SENTENCES = (
    "今天天氣很好，我們去公園散步吧。",
    "請把窗戶打開，房間裡有點悶。",
    "這家餐廳的牛肉麵非常好吃。",
    "我們在2024年買了3台電腦。",
    "火車將在下午5點30分抵達台北。",
    "他每天早上六點起床跑步。",
    "這本書一共有12個章節。",
    "圖書館週末開放到晚上九點。",
    "明天的會議改到十點半。",
    "你知道最近的捷運站在哪裡嗎？",
    "我喜歡在下雨天聽音樂。",
    "這次考試我得了95分！",
    "银行的营业时间是早上九点到下午四点。",
    "请在下一个路口向右转。",
    "我们公司今年招了20个新员工。",
    "这个问题需要更多的时间讨论。",
)
EN_SENTENCES = (
    "The weather is nice today.",
    "Please send me the report by Friday.",
    "How long does it take to get to the airport?",
    "I would like a cup of coffee, please.",
    "The meeting starts at nine thirty.",
    "She has been learning Chinese for two years.",
    "Turn left at the next traffic light.",
    "This book has twelve chapters.",
)
CS_SENTENCES = (
    "我明天要去 meeting 討論 project。",
    "這個 bug 我已經 fix 好了。",
    "請幫我把 email 轉寄給 manager。",
    "我們下午用 Zoom 開會。",
    "這份 report 的 deadline 是星期五。",
    "他剛剛買了新的 iPhone。",
)
# 對話腳本：(使用者, 助理, 搶話時使用者說的話, 搶話後助理的回應)。
DIALOGUES = (
    (
        "你好，請問今天會下雨嗎？",
        "今天下午有可能下雨，出門記得帶傘，氣溫大約二十五度左右。",
        "等一下，那明天呢？",
        "明天是晴天。",
    ),
    (
        "幫我訂一張去高雄的車票。",
        "好的，請問您要搭幾點的車，我可以幫您查詢今天所有的班次。",
        "不用了，我改天再訂。",
        "好的，沒問題。",
    ),
    (
        "What time is the meeting tomorrow?",
        "The meeting is at ten in the morning, in the main conference room on the third floor.",
        "Sorry, can we move it?",
        "Sure, I will check the calendar.",
    ),
    (
        "我想學 Python，要從哪裡開始？",
        "你可以先從基本語法開始，然後做一些小專案來練習，慢慢累積經驗。",
        "那有推薦的書嗎？",
        "可以參考官方教學文件。",
    ),
)
BACKCHANNELS = ("嗯", "對", "好")
INSTRUCTIONS = (
    ("請用一句話介紹台北。", "台北是台灣的首都，也是一座熱鬧的城市。"),
    ("幫我翻譯 good morning。", "Good morning 的意思是早安。"),
    ("一加一等於多少？", "一加一等於二。"),
    ("請推薦一本好書。", "我推薦你讀紅樓夢。"),
    ("Tell me a short joke.", "Why did the chicken cross the road? To get to the other side."),
    ("今天適合去爬山嗎？", "天氣晴朗的話很適合，記得多喝水。"),
)
# VAD 用的句子：不含逗號，避免句中停頓被當成插入的靜音。
VAD_SENTENCES = (
    "今天天氣很好",
    "我們明天去爬山",
    "請把門關上",
    "這是一個測試句子",
    "Good morning everyone",
    "火車快要開了",
)
VAD_SILENCES = (0.6, 0.9, 1.3)

# 說話人：(espeak 聲音, 音高, 語速)。
ZH_SPEAKERS = {
    "S0002": ("cmn", 50, 160),
    "S0003": ("cmn+f3", 70, 150),
    "S0724": ("cmn+m3", 40, 170),
    "S0764": ("cmn+f2", 60, 165),
    "S0765": ("cmn+m1", 45, 155),
    "S0766": ("cmn+f4", 75, 160),
}
AISHELL_SPLITS = {"train": ("S0002", "S0003"), "dev": ("S0724",), "test": ("S0764",)}
EN_VOICES = (("en-us", 50, 160), ("en-us+f3", 70, 150), ("en-us+m3", 40, 170))
USER_VOICE = ("cmn+f3", 70, 165)
ASSISTANT_VOICE = ("cmn", 45, 175)
# 示範情緒：以 espeak-ng 的音高、語速與音量變化模擬說話風格（音高差, 語速差, 音量）。
# 使用者的情緒是情緒頭的目標；助理以同一標籤作為回應風格（`response_style`，第 3 階段的條件）。
EMOTION_STYLES = {
    "neutral": (0, 0, 100),
    "happy": (20, 30, 115),
    "sad": (-25, -55, 70),
    "angry": (-10, 45, 170),
    "surprised": (29, 10, 130),
}
DEMO_EMOTIONS = tuple(EMOTION_STYLES)


def styled(voice: tuple[str, int, int], emotion: str) -> tuple[str, int, int, int]:
    """把說話人 `(聲音, 音高, 語速)` 套上情緒風格，回傳 `synth` 的 `(聲音, 音高, 語速, 音量)`。"""
    if emotion not in EMOTION_STYLES:
        raise ValueError(f"未知的情緒 {emotion!r}；可用：{', '.join(EMOTION_STYLES)}")
    dp, ds, amp = EMOTION_STYLES[emotion]
    name, pitch, speed = voice
    return name, int(np.clip(pitch + dp, 0, 99)), int(max(80, speed + ds)), amp


def has_espeak() -> bool:
    """本機是否有 espeak-ng。"""
    return shutil.which("espeak-ng") is not None


def _voice_for(text: str, voice: str) -> str:
    """純英文句子改用英文聲音（保留變體），其餘用原聲音。"""
    if language_of(text) == "en" and voice.startswith("cmn"):
        return "en-us" + voice[3:]
    return voice


def synth(
    text: str,
    voice: str = "cmn",
    pitch: int = 50,
    speed: int = 160,
    amplitude: int = 100,
    sr: int = SR,
    trim: bool = True,
) -> np.ndarray:
    """以 espeak-ng 合成語音並以 soxr 重取樣到 `sr`；`trim` 時去掉頭尾的靜音。"""
    cmd = [
        "espeak-ng",
        "-v",
        _voice_for(text, voice),
        "-p",
        str(pitch),
        "-s",
        str(speed),
        "-a",
        str(amplitude),
        "--stdout",
        text,
    ]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    except FileNotFoundError as e:
        raise RuntimeError("找不到 espeak-ng；請安裝 Debian 套件 espeak-ng") from e
    wave, file_sr = sf.read(io.BytesIO(out), dtype="float32")
    wave = resample(wave, file_sr, sr)
    if trim:
        idx = np.flatnonzero(np.abs(wave) > 0.02)
        if len(idx):
            wave = wave[idx[0] : idx[-1] + 1]
    return np.ascontiguousarray(wave, dtype=np.float32)


def _client_id(name: str) -> str:
    return hashlib.sha512(f"demo-speaker-{name}".encode()).hexdigest()


@dataclass
class _Ctx:
    root: Path
    rng: np.random.Generator
    scale: int
    counts: dict[str, int]


def _pick(rng: np.random.Generator, items: tuple, n: int) -> list:
    """依種子抽選 n 個（不足時重複整輪）。"""
    out: list = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def _make_aishell(ctx: _Ctx) -> None:
    base = ctx.root / "aishell" / "data_aishell"
    lines = []
    utt = 100
    for split, spks in AISHELL_SPLITS.items():
        for spk in spks:
            voice, pitch, speed = ZH_SPEAKERS[spk]
            for text in _pick(ctx.rng, ZH_SENTENCES, 3 * ctx.scale):
                utt += 1
                uid = f"BAC009{spk}W{utt:04d}"
                norm = normalize_zh(text, "t2s", True, False)
                wave = synth(norm, voice, pitch, speed)
                write_audio(base / "wav" / split / spk / f"{uid}.wav", wave, SR)
                lines.append(f"{uid} {' '.join(norm)}")
    tdir = base / "transcript"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "aishell_transcript_v0.8.txt").write_text("\n".join(sorted(lines)) + "\n", "utf-8")
    ctx.counts["aishell"] = len(lines)


CV_COLUMNS = (
    "client_id",
    "path",
    "sentence",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
)


def _make_commonvoice(ctx: _Ctx) -> None:
    base = ctx.root / "commonvoice" / CV_VERSION
    plan = {
        "zh-TW": (ZH_SENTENCES[:12] + CS_SENTENCES, list(ZH_SPEAKERS.values())[2:], 6),
        "en": (EN_SENTENCES, list(EN_VOICES), 3),
    }
    total = 0
    for locale, (sentences, voices, per_split) in plan.items():
        ldir = base / locale
        rows: dict[str, list[list[str]]] = {"train": [], "dev": [], "test": []}
        n = 0
        for split, k in (
            ("train", per_split),
            ("dev", max(1, per_split // 3)),
            ("test", max(1, per_split // 3)),
        ):
            for text in _pick(ctx.rng, sentences, k * ctx.scale):
                n += 1
                vi = int(ctx.rng.integers(len(voices)))
                voice, pitch, speed = voices[vi]
                name = f"common_voice_{locale}_{40000000 + n}.mp3"
                wave = synth(text, voice, pitch, speed, sr=CV_SR, trim=False)
                write_audio(ldir / "clips" / name, 0.9 * wave, CV_SR)
                gender = "female" if "+f" in voice else "male"
                rows[split].append(
                    [
                        _client_id(f"{locale}-{vi}"),
                        name,
                        text,
                        "2",
                        "0",
                        "thirties",
                        gender,
                        "",
                        "",
                        locale,
                        "",
                    ]
                )
        validated = rows["train"] + rows["dev"] + rows["test"]
        for split, rs in list(rows.items()) + [("validated", validated)]:
            with (ldir / f"{split}.tsv").open("w", encoding="utf-8", newline="") as f:
                f.write("\t".join(CV_COLUMNS) + "\n")
                for r in rs:
                    f.write("\t".join(r) + "\n")
        total += n
    ctx.counts["commonvoice"] = total


def _place(track: np.ndarray, wave: np.ndarray, start: int) -> np.ndarray:
    end = start + len(wave)
    if end > len(track):
        track = np.concatenate([track, np.zeros(end - len(track) + SR, np.float32)])
    track[start:end] += wave
    return track


def _t(samples: int) -> float:
    return round(samples / SR, 4)


def _make_dialogue(
    ctx: _Ctx, script: tuple[str, str, str, str], emotion: str = "neutral"
) -> dict[str, Any]:
    """一段對話：一般輪替（停頓）、助理說話中的附和（backchannel）、使用者搶話（barge-in）。

    使用者以 `emotion` 的風格說話，助理以同一風格回應。
    """
    rng = ctx.rng
    user_voice = styled(USER_VOICE, emotion)
    asst_voice = styled(ASSISTANT_VOICE, emotion)
    user_txt, asst_txt, barge_txt, reply_txt = script
    user = np.zeros(SR * 4, np.float32)
    asst = np.zeros(SR * 4, np.float32)
    turns: list[dict[str, Any]] = []
    overlaps: list[dict[str, Any]] = []
    t = int(SR * rng.uniform(0.3, 0.6))

    def say(track, role, text, start, kind="utterance", wave=None):
        voice = user_voice if role == "user" else asst_voice
        w = synth(text, *voice) if wave is None else wave
        track = _place(track, w, start)
        turns.append(
            {
                "speaker": role,
                "start": _t(start),
                "end": _t(start + len(w)),
                "text": text,
                "kind": kind,
            }
        )
        return track, start + len(w)

    # 一般輪替：使用者說完、停頓後助理回答；助理回答中間使用者附和一聲。
    user, t = say(user, "user", user_txt, t)
    a_start = t + int(SR * rng.uniform(0.3, 0.8))
    a_wave = synth(asst_txt, *asst_voice)
    asst, a_end = say(asst, "assistant", asst_txt, a_start, wave=a_wave)
    bc = BACKCHANNELS[int(rng.integers(len(BACKCHANNELS)))]
    bc_start = a_start + int(len(a_wave) * rng.uniform(0.3, 0.5))
    user, bc_end = say(user, "user", bc, bc_start, kind="backchannel")
    overlaps.append(
        {
            "start": _t(bc_start),
            "end": _t(min(bc_end, a_end)),
            "kind": "backchannel",
            "by": "user",
            "onset": _t(bc_start),
        }
    )
    # 第二輪：助理又開始說，使用者中途搶話，助理在反應時間後停下。
    a2_start = a_end + int(SR * rng.uniform(0.4, 0.9))
    a2_wave = synth(asst_txt, *asst_voice)
    barge = a2_start + int(len(a2_wave) * rng.uniform(0.35, 0.6))
    react = int(SR * 0.25)
    stop = barge + react
    cut = a2_wave[: stop - a2_start].copy()
    fade = min(len(cut), int(SR * 0.02))
    cut[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    asst, _ = say(asst, "assistant", asst_txt, a2_start, kind="interrupted", wave=cut)
    user, u2_end = say(user, "user", barge_txt, barge)
    overlaps.append(
        {"start": _t(barge), "end": _t(stop), "kind": "barge_in", "by": "user", "onset": _t(barge)}
    )
    r_start = u2_end + int(SR * rng.uniform(0.3, 0.7))
    asst, r_end = say(asst, "assistant", reply_txt, r_start)
    total = max(r_end, u2_end) + int(SR * 0.5)
    stereo = np.zeros((2, total), np.float32)
    stereo[0, : min(total, len(user))] = user[:total]
    stereo[1, : min(total, len(asst))] = asst[:total]
    stereo += ctx.rng.normal(0, 3e-4, stereo.shape).astype(np.float32)
    turns.sort(key=lambda x: (x["start"], x["speaker"]))
    return {
        "wave": stereo,
        "turns": turns,
        "overlaps": overlaps,
        "duration": _t(total),
        "emotion": emotion,
        "response_style": emotion,
    }


def write_dialogue(folder: Path, did: str, dia: dict[str, Any]) -> None:
    """把一段雙聲道對話（`dia["wave"]` 加標註欄位）寫成 `did.wav` 與對話格式的 `did.json`。"""
    write_audio(folder / f"{did}.wav", dia.pop("wave"), SR)
    meta = {
        "id": did,
        "audio": f"{did}.wav",
        "sample_rate": SR,
        "channels": 2,
        "channel_roles": ["user", "assistant"],
        **dia,
    }
    (folder / f"{did}.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), "utf-8")


def _make_dialogues(ctx: _Ctx) -> None:
    d = ctx.root / "dialogues"
    n = 0
    for i, script in enumerate(_pick(ctx.rng, DIALOGUES, 3 * ctx.scale)):
        did = f"dlg{i:04d}"
        dia = _make_dialogue(ctx, script, DEMO_EMOTIONS[i % len(DEMO_EMOTIONS)])
        write_dialogue(d, did, dia)
        n += 1
    ctx.counts["dialogues"] = n


def _make_instructions(ctx: _Ctx) -> None:
    d = ctx.root / "instructions"
    lines = []
    for i, (ins, resp) in enumerate(_pick(ctx.rng, INSTRUCTIONS, 4 * ctx.scale)):
        iid = f"ins{i:04d}"
        # 指令接在對話之後輪流取情緒，讓五種情緒在小語料裡都出現。
        emotion = DEMO_EMOTIONS[(i + 3 * ctx.scale) % len(DEMO_EMOTIONS)]
        q = synth(ins, *styled(USER_VOICE, emotion))
        a = synth(resp, *styled(ASSISTANT_VOICE, emotion))
        pad = np.zeros(int(SR * 0.2), np.float32)
        write_audio(d / "audio" / f"{iid}_instruction.wav", np.concatenate([pad, q, pad]), SR)
        write_audio(d / "audio" / f"{iid}_response.wav", np.concatenate([pad, a, pad]), SR)
        lines.append(
            {
                "id": iid,
                "instruction_audio": f"audio/{iid}_instruction.wav",
                "instruction_text": ins,
                "response_text": resp,
                "response_audio": f"audio/{iid}_response.wav",
                "speaker": "demo_user",
                "task": "speech_instruction",
                "emotion": emotion,
                "response_style": emotion,
            }
        )
    d.mkdir(parents=True, exist_ok=True)
    with (d / "instructions.jsonl").open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    ctx.counts["instructions"] = len(lines)


def _make_vad(ctx: _Ctx) -> None:
    """幾個含已知長度靜音的長檔：語音島為去頭尾靜音後的合成語音，靜音處只有極小的雜訊。"""
    d = ctx.root / "vad"
    truth: dict[str, Any] = {}
    for i in range(max(2, ctx.scale)):
        vid = f"vad{i:04d}"
        texts = _pick(ctx.rng, VAD_SENTENCES, 3)
        sils = [VAD_SILENCES[j] for j in ctx.rng.permutation(len(VAD_SILENCES))][:2]
        lead = int(SR * 0.5)
        parts = [np.zeros(lead, np.float32)]
        pos = lead
        speech, silences = [], []
        for k, text in enumerate(texts):
            w = synth(text, *ZH_SPEAKERS["S0002"])
            parts.append(w)
            speech.append([_t(pos), _t(pos + len(w))])
            pos += len(w)
            gap = int(SR * (sils[k] if k < len(sils) else 0.5))
            if k < len(sils):
                silences.append([_t(pos), _t(pos + gap)])
            parts.append(np.zeros(gap, np.float32))
            pos += gap
        wave = np.concatenate(parts)
        wave += ctx.rng.normal(0, 1e-3, wave.shape).astype(np.float32)
        write_audio(d / f"{vid}.wav", wave, SR)
        truth[vid] = {
            "audio": f"{vid}.wav",
            "sample_rate": SR,
            "duration": _t(len(wave)),
            "speech": speech,
            "silences": silences,
            "texts": texts,
        }
    d.mkdir(parents=True, exist_ok=True)
    (d / "vad_truth.json").write_text(json.dumps(truth, ensure_ascii=False, indent=1), "utf-8")
    ctx.counts["vad"] = len(truth)


def make_demo_corpus(output_dir: str | Path, seed: int = 0, scale: int = 1) -> dict[str, Any]:
    """建立示範語料；回傳 demo_info（種子、規模、各部分檔案數）。同一種子產出相同檔案。"""
    if not has_espeak():
        raise UserError("找不到 espeak-ng；示範語料需要它（Debian 套件 espeak-ng）")
    if scale < 1:
        raise UserValueError(f"--scale 必須 >= 1，收到 {scale}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(root, np.random.default_rng(seed), int(scale), {})
    _make_aishell(ctx)
    _make_commonvoice(ctx)
    _make_dialogues(ctx)
    _make_instructions(ctx)
    _make_vad(ctx)
    info = {
        "seed": seed,
        "scale": scale,
        "sample_rate": SR,
        "counts": ctx.counts,
        "commonvoice_version": CV_VERSION,
    }
    (root / "demo_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=1), "utf-8")
    return info


# 隨專案附上的範例提問（客戶端與網頁用）：檔名 → (文字, espeak-ng 聲音)。
EXAMPLES_DIR = "examples"
EXAMPLE_QUESTIONS: dict[str, tuple[str, tuple[str, int, int]]] = {
    "question_zh.wav": ("你好，明天會下雨嗎？", USER_VOICE),
    "question_en.wav": ("Hello, will it rain tomorrow?", EN_VOICES[0]),
}
EXAMPLE_LEAD_SECONDS = 0.3


def make_examples(output_dir: str | Path = EXAMPLES_DIR) -> dict[str, float]:
    """以 espeak-ng 寫出範例提問（16 kHz 單聲道 16 位元 WAV，前後各留一小段靜音）；回傳檔名 → 秒數。"""
    if not has_espeak():
        raise RuntimeError("找不到 espeak-ng；範例提問需要它（Debian 套件 espeak-ng）")
    out = Path(output_dir)
    pad = np.zeros(int(SR * EXAMPLE_LEAD_SECONDS), np.float32)
    lengths = {}
    for name, (text, voice) in EXAMPLE_QUESTIONS.items():
        wave = np.concatenate([pad, 0.9 * synth(text, *voice), pad])
        write_audio(out / name, wave, SR)
        lengths[name] = round(len(wave) / SR, 3)
    return lengths


def ensure_demo_corpus(output_dir: str | Path, seed: int = 0, scale: int = 1) -> Path:
    """示範語料不存在（或種子、規模不同）時建立；回傳資料夾路徑。"""
    root = Path(output_dir)
    info_path = root / "demo_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text("utf-8"))
        if info.get("seed") == seed and info.get("scale") == scale:
            return root
    make_demo_corpus(root, seed=seed, scale=scale)
    return root
