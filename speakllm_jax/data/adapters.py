"""語料轉接器：把各語料的原始目錄格式轉成清單列（見 `speakllm_jax.data.manifest`）。

每個轉接器是 `fn(root, skips, **options) -> Iterator[dict]`，以 `ADAPTERS[名稱]` 取得：
    aishell1       data_aishell/wav/{split}/{spk}/*.wav + transcript/aishell_transcript_v0.8.txt
    aishell3       {train,test}/content.txt（漢字與拼音交錯）+ {split}/wav/{spk}/*.wav
    commonvoice    cv-corpus-*/{locale}/{train,dev,test}.tsv + clips/*.mp3
    librispeech    LibriSpeech/{subset}/{spk}/{chapter}/*.trans.txt + *.flac
    wenetspeech    WenetSpeech.json（audios[].segments[] 的 begin_time/end_time）
    magicdata_ramc WAV/*.wav + TXT/*.txt（"[start,end]\\t說話人\\t性別,口音\\t文字"）
    dialogue       本專案的雙聲道對話：{id}.wav + {id}.json（turns、overlaps，可選 pauses）
    instructions   本專案的語音指令：instructions.jsonl（指令音訊、回應文字、回應音訊）
    vad_truth      本專案的長檔：vad_truth.json（每段語音的時間與文字，成為 turns）
    jsonl          通用 JSONL 清單；缺少的 duration／sample_rate／channels 由音訊標頭補上

音訊壞掉、缺檔、取樣率不符、轉寫缺漏或非 UTF-8 的列都會略過並記入 `SkipCounter`，不會中斷。
`build_manifests` 依資料設定（configs/data/*.py）跑所有語料、驗證並寫出清單與略過報告。
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from speakllm_jax.audio.constants import SAMPLE_RATE
from speakllm_jax.audio.io import (
    AudioError,
    SkipCounter,
    audio_info,
    check_audio_detail,
    load_audio,
)
from speakllm_jax.cli import UserFileError, UserValueError, suggest
from speakllm_jax.data.manifest import iter_manifest, resolve_path, validate_row, write_manifest
from speakllm_jax.data.registry import LOCAL_REGISTRY, read_local_registry
from speakllm_jax.text.codeswitch import language_of
from speakllm_jax.text.normalize import fix_spaces, remove_annotations

Adapter = Callable[..., Iterator[dict[str, Any]]]
ADAPTERS: dict[str, Adapter] = {}
SEGMENT_TOLERANCE = 0.05


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    """以名稱登記轉接器的裝飾器。"""

    def deco(fn: Adapter) -> Adapter:
        ADAPTERS[name] = fn
        return fn

    return deco


def get_adapter(name: str) -> Adapter:
    """依名稱取得轉接器；未知名稱拋出 ValueError 並列出可用者。"""
    if name not in ADAPTERS:
        raise UserValueError(
            f"未知的轉接器 {name!r}{suggest(name, ADAPTERS)}；可用：{sorted(ADAPTERS)}"
        )
    return ADAPTERS[name]


class _Prober:
    """讀音訊標頭並快取；失敗時依原因記入略過計數。"""

    def __init__(self, skips: SkipCounter, expected_sr: int | None) -> None:
        self.skips = skips
        self.expected_sr = expected_sr
        self.cache: dict[str, dict[str, Any] | AudioError] = {}

    def __call__(self, path: Path, key: str) -> dict[str, Any] | None:
        k = str(path)
        if k not in self.cache:
            try:
                info = audio_info(path)
                if self.expected_sr and info["sample_rate"] != int(self.expected_sr):
                    raise AudioError(
                        "wrong_rate",
                        path,
                        f"檔案 {info['sample_rate']} Hz，語料應為 {self.expected_sr} Hz",
                    )
                self.cache[k] = info
            except AudioError as e:
                self.cache[k] = e
        res = self.cache[k]
        if isinstance(res, AudioError):
            self.skips.add_error(key, res)
            return None
        return res


def _row(
    uid: str,
    audio: Path,
    info: dict[str, Any],
    text: str,
    speaker: str,
    corpus: str,
    split: str,
    offset: float = 0.0,
    duration: float | None = None,
    language: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    row = {
        "id": uid,
        "audio": str(audio),
        "offset": round(float(offset), 4),
        "duration": round(float(info["duration"] - offset if duration is None else duration), 4),
        "sample_rate": info["sample_rate"],
        "channels": info["channels"],
        "text": text,
        "language": language or language_of(text),
        "speaker": speaker,
        "corpus": corpus,
        "split": split,
    }
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _segment_ok(
    info: dict[str, Any], start: float, end: float, key: str, skips: SkipCounter
) -> bool:
    if not (0 <= start < end):
        skips.add(key, "bad_segment", f"時間不合法 [{start}, {end}]")
        return False
    if end > info["duration"] + SEGMENT_TOLERANCE:
        skips.add(key, "too_short", f"片段結束 {end:.3f}s 超出音檔長度 {info['duration']:.3f}s")
        return False
    return True


def _read_lines(path: Path, skips: SkipCounter) -> Iterator[tuple[int, str]]:
    """逐行讀文字檔；非 UTF-8 的行以「檔名:行號」記為 non_utf8 並略過。"""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                skips.add(f"{path}:{lineno}", "non_utf8", str(e))
                continue
            if line:
                yield lineno, line.lstrip("\ufeff")


def _clean(text: str) -> str:
    return fix_spaces(remove_annotations(text))


def _find(root: Path, rel: str) -> Path:
    """在 root 或其上一層找某個子路徑（使用者可指向語料資料夾或其上層）。"""
    for base in (root, root.parent):
        if (base / rel).exists():
            return base / rel
    hits = sorted(root.glob(f"*/{rel}"))
    if hits:
        return hits[0]
    raise UserFileError(f"{root}: 找不到 {rel}；請確認 root 指向語料解壓後的資料夾")


def _want(split: str, splits: Any) -> bool:
    return not splits or split in splits


@register_adapter("aishell1")
def aishell1(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "aishell1",
    splits: Any = None,
    expected_sr: int | None = SAMPLE_RATE,
    **_: Any,
) -> Iterator[dict]:
    """AISHELL-1（openslr 33）：轉寫檔每行「BAC009S0002W0122 而 对 楼市 ...」，以空白分詞。"""
    root = Path(root)
    base = _find(root, "transcript/aishell_transcript_v0.8.txt").parents[1]
    wav_root = base / "wav"
    if not list(wav_root.glob("*/*/*.wav")) and list(wav_root.glob("*.tar.gz")):
        raise ValueError(
            f"{wav_root}: 音訊仍是 S*.tar.gz 壓縮檔，請先解壓（data/download.py 會自動解壓）"
        )
    trans: dict[str, str] = {}
    tpath = base / "transcript" / "aishell_transcript_v0.8.txt"
    for lineno, line in _read_lines(tpath, skips):
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            skips.add(f"{tpath}:{lineno}", "empty_text", "轉寫行沒有文字")
            continue
        trans[parts[0]] = parts[1]
    probe = _Prober(skips, expected_sr)
    for wav in sorted(wav_root.glob("*/*/*.wav")):
        split, spk, uid = wav.parent.parent.name, wav.parent.name, wav.stem
        if not _want(split, splits):
            continue
        if uid not in trans:
            skips.add(str(wav), "no_transcript", f"{uid} 不在 {tpath.name}")
            continue
        info = probe(wav, str(wav))
        if info is None:
            continue
        yield _row(uid, wav, info, _clean(trans[uid]), spk, corpus, split, text_raw=trans[uid])


@register_adapter("aishell3")
def aishell3(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "aishell3",
    splits: Any = None,
    expected_sr: int | None = 44100,
    **_: Any,
) -> Iterator[dict]:
    """AISHELL-3（openslr 93）：content.txt 每行「SSB00050001.wav\\t广 guang3 州 zhou1 ...」。"""
    root = Path(root)
    probe = _Prober(skips, expected_sr)
    found = False
    for split in ("train", "test"):
        content = root / split / "content.txt"
        if not content.is_file() or not _want(split, splits):
            continue
        found = True
        for lineno, line in _read_lines(content, skips):
            name, _, rest = line.partition("\t")
            toks = rest.split()
            if not name.endswith(".wav") or not toks:
                skips.add(f"{content}:{lineno}", "bad_line", line[:80])
                continue
            chars, pinyin = toks[0::2], toks[1::2]
            uid = name[:-4]
            spk = uid[:7]
            wav = root / split / "wav" / spk / name
            info = probe(wav, str(wav))
            if info is None:
                continue
            yield _row(
                uid,
                wav,
                info,
                "".join(chars),
                spk,
                corpus,
                split,
                text_raw=rest,
                source_pinyin=" ".join(pinyin),
            )
    if not found:
        raise UserFileError(f"{root}: 找不到 train/content.txt 或 test/content.txt")


CV_SPLITS = ("train", "dev", "test")


@register_adapter("commonvoice")
def commonvoice(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "commonvoice",
    splits: Any = None,
    locale: str | None = None,
    expected_sr: int | None = None,
    **_: Any,
) -> Iterator[dict]:
    """Common Voice：{locale}/{split}.tsv（client_id、path、sentence…）與 clips/ 下的 mp3。

    `root` 可指向 cv-corpus-*/（此時需 `locale`，或讀取其下所有語言）或某個語言資料夾。
    """
    root = Path(root)
    if (root / "clips").is_dir():
        locales = [root]
    elif locale:
        locales = [root / locale]
    else:
        locales = sorted(p for p in root.iterdir() if (p / "clips").is_dir())
    if not locales or not all((d / "clips").is_dir() for d in locales):
        raise UserFileError(f"{root}: 找不到 Common Voice 的 clips/ 資料夾（locale={locale}）")
    probe = _Prober(skips, expected_sr)
    for ldir in locales:
        for split in splits or CV_SPLITS:
            tsv = ldir / f"{split}.tsv"
            if not tsv.is_file():
                continue
            yield from _cv_tsv(tsv, ldir, split, corpus, probe, skips)


def _cv_tsv(
    tsv: Path, ldir: Path, split: str, corpus: str, probe: _Prober, skips: SkipCounter
) -> Iterator[dict]:
    with tsv.open("rb") as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
        for lineno, raw in enumerate(f, start=2):
            key = f"{tsv}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                skips.add(key, "non_utf8", str(e))
                continue
            if not line.strip():
                continue
            vals = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
            rec = dict(zip(header, vals))
            if not rec.get("path") or "sentence" not in rec:
                skips.add(key, "bad_line", "缺少 path 或 sentence 欄")
                continue
            text = _clean(rec["sentence"])
            if not text:
                skips.add(key, "empty_text", "sentence 為空")
                continue
            clip = ldir / "clips" / rec["path"]
            info = probe(clip, key)
            if info is None:
                continue
            loc = rec.get("locale") or ldir.name
            yield _row(
                f"cv_{loc}_{Path(rec['path']).stem}",
                clip,
                info,
                text,
                rec.get("client_id") or "unknown",
                corpus,
                split,
                text_raw=rec["sentence"],
                source_locale=loc,
                source_gender=rec.get("gender") or None,
                source_age=rec.get("age") or None,
            )


def _libri_split(subset: str) -> str:
    for s in ("train", "dev", "test"):
        if subset.startswith(s):
            return s
    return subset


def _libri_lines(
    root: str | os.PathLike,
    top: str,
    suffix: str,
    skips: SkipCounter,
    splits: Any,
    subsets: Any,
) -> Iterator[tuple[Path, str, str, int, str]]:
    """LibriSpeech／LibriTTS 的目錄格式 {subset}/{spk}/{chapter}/*{suffix}：依子集與切分篩選後，
    逐行給（轉寫檔, 子集, 切分, 行號, 該行）。"""
    root = Path(root)
    if (root / top).is_dir():
        root = root / top
    files = sorted(root.glob(f"*/*/*/*{suffix}"))
    if not files:
        raise UserFileError(f"{root}: 找不到 */*/*/*{suffix}（{top} 目錄格式）")
    for tf in files:
        subset = tf.parents[2].name
        split = _libri_split(subset)
        if (subsets and subset not in subsets) or not _want(split, splits):
            continue
        for lineno, line in _read_lines(tf, skips):
            yield tf, subset, split, lineno, line


@register_adapter("librispeech")
def librispeech(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "librispeech",
    splits: Any = None,
    subsets: Any = None,
    expected_sr: int | None = SAMPLE_RATE,
    **_: Any,
) -> Iterator[dict]:
    """LibriSpeech（openslr 12）：{subset}/{spk}/{chapter}/{spk}-{chapter}.trans.txt 與 .flac。"""
    probe = _Prober(skips, expected_sr)
    lines = _libri_lines(root, "LibriSpeech", ".trans.txt", skips, splits, subsets)
    for tf, subset, split, lineno, line in lines:
        uid, _, text = line.partition(" ")
        if not text.strip():
            skips.add(f"{tf}:{lineno}", "empty_text", uid)
            continue
        flac = tf.parent / f"{uid}.flac"
        info = probe(flac, str(flac))
        if info is None:
            continue
        yield _row(
            uid,
            flac,
            info,
            text.strip(),
            uid.split("-")[0],
            corpus,
            split,
            language="en",
            source_subset=subset,
        )


WENET_SPLITS = {"DEV": "dev", "TEST_NET": "test", "TEST_MEETING": "test"}


@register_adapter("wenetspeech")
def wenetspeech(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "wenetspeech",
    splits: Any = None,
    train_subset: str = "M",
    expected_sr: int | None = SAMPLE_RATE,
    min_confidence: float = 0.0,
    **_: Any,
) -> Iterator[dict]:
    """WenetSpeech：WenetSpeech.json 的 audios[].segments[]（begin_time、end_time、subsets）。

    訓練資料取 `train_subset`（S／M／L／W）所屬片段；DEV 為 dev，TEST_NET／TEST_MEETING 為 test。
    """
    root = Path(root)
    meta = root / "WenetSpeech.json"
    if not meta.is_file():
        raise UserFileError(f"{root}: 找不到 WenetSpeech.json")
    with meta.open(encoding="utf-8") as f:
        data = json.load(f)
    probe = _Prober(skips, expected_sr)
    for audio in data.get("audios", []):
        path = root / audio["path"]
        for seg in audio.get("segments", []):
            subs = seg.get("subsets", [])
            split = next((WENET_SPLITS[s] for s in subs if s in WENET_SPLITS), None)
            if split is None and train_subset in subs:
                split = "train"
            if split is None or not _want(split, splits):
                continue
            key = f"{meta}:{seg.get('sid')}"
            if float(seg.get("confidence", 1.0)) < min_confidence:
                skips.add(key, "low_confidence", str(seg.get("confidence")))
                continue
            text = _clean(seg.get("text", ""))
            if not text:
                skips.add(key, "empty_text", "")
                continue
            info = probe(path, key)
            if info is None:
                continue
            b, e = float(seg["begin_time"]), float(seg["end_time"])
            if not _segment_ok(info, b, e, key, skips):
                continue
            yield _row(
                seg["sid"],
                path,
                info,
                text,
                audio["aid"],
                corpus,
                split,
                offset=b,
                duration=e - b,
                source_id=audio["aid"],
                source_confidence=seg.get("confidence"),
            )


_RAMC_LINE = re.compile(r"^\[\s*([0-9.]+)\s*,\s*([0-9.]+)\s*\]\s+(\S+)\s+(\S+)\s*(.*)$")


@register_adapter("magicdata_ramc")
def magicdata_ramc(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "magicdata_ramc",
    splits: Any = None,
    default_split: str = "train",
    expected_sr: int | None = SAMPLE_RATE,
    **_: Any,
) -> Iterator[dict]:
    """MagicData-RAMC（openslr 123）：TXT/ 下每行「[1.319,6.691]\\tG00000140\\t女,普通话\\t文字」。

    說話人 G00000000 為非語音標註，略過；WAV/ 與 TXT/ 下可有 train／dev／test 子資料夾。
    """
    root = Path(root)
    if not (root / "TXT").is_dir() and (root / "MDT2021S003").is_dir():
        root = root / "MDT2021S003"
    if not (root / "TXT").is_dir():
        raise UserFileError(f"{root}: 找不到 TXT/ 資料夾（MagicData-RAMC 目錄格式）")
    probe = _Prober(skips, expected_sr)
    for txt in sorted((root / "TXT").rglob("*.txt")):
        rel = txt.relative_to(root / "TXT")
        split = rel.parts[0] if len(rel.parts) > 1 else default_split
        if not _want(split, splits):
            continue
        wav = (root / "WAV" / rel).with_suffix(".wav")
        for lineno, line in _read_lines(txt, skips):
            key = f"{txt}:{lineno}"
            m = _RAMC_LINE.match(line)
            if not m:
                skips.add(key, "bad_line", line[:80])
                continue
            b, e, spk, attrs, raw = float(m[1]), float(m[2]), m[3], m[4], m[5]
            if spk == "G00000000":
                continue
            text = _clean(raw)
            if not text:
                skips.add(key, "empty_text", raw[:40])
                continue
            info = probe(wav, key)
            if info is None or not _segment_ok(info, b, e, key, skips):
                continue
            yield _row(
                f"{txt.stem}_{spk}_{int(round(b * 1000)):08d}",
                wav,
                info,
                text,
                spk,
                corpus,
                split,
                offset=b,
                duration=e - b,
                text_raw=raw,
                source_id=txt.stem,
                source_attrs=attrs,
            )


@register_adapter("dialogue")
def dialogue(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "demo_dialogue",
    split: str = "train",
    splits: Any = None,
    expected_sr: int | None = None,
    **_: Any,
) -> Iterator[dict]:
    """本專案的雙聲道對話：每段一個 {id}.json（turns、overlaps、channel_roles，可選 pauses、
    language、split）與立體聲音檔。"""
    root = Path(root)
    metas = sorted(root.glob("*.json"))
    if not metas:
        raise UserFileError(f"{root}: 找不到對話 JSON")
    probe = _Prober(skips, expected_sr)
    for mp in metas:
        try:
            meta = json.loads(mp.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            skips.add(str(mp), "bad_json", str(e))
            continue
        sp = meta.get("split", split)
        if not _want(sp, splits):
            continue
        wav = resolve_path(meta.get("audio", f"{mp.stem}.wav"), mp.parent)
        info = probe(wav, str(mp))
        if info is None:
            continue
        roles = meta.get("channel_roles", ["user", "assistant"])
        if info["channels"] != len(roles):
            skips.add(str(mp), "bad_field", f"音檔 {info['channels']} 聲道，channel_roles={roles}")
            continue
        turns = sorted(meta.get("turns", []), key=lambda t: t["start"])
        text = fix_spaces(" ".join(t["text"] for t in turns if t.get("kind") != "backchannel"))
        yield _row(
            meta.get("id", mp.stem),
            wav,
            info,
            text,
            meta.get("speaker", "demo_pair"),
            corpus,
            sp,
            channel_roles=roles,
            turns=turns,
            language=meta.get("language"),
            overlaps=meta.get("overlaps", []),
            pauses=meta.get("pauses"),
            task="duplex_dialogue",
            emotion=meta.get("emotion"),
            response_style=meta.get("response_style"),
        )


@register_adapter("instructions")
def instructions(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "demo_instructions",
    split: str = "train",
    splits: Any = None,
    expected_sr: int | None = None,
    filename: str = "instructions.jsonl",
    **_: Any,
) -> Iterator[dict]:
    """本專案的語音指令配對：每行 {id, instruction_audio, instruction_text, response_text,
    response_audio, speaker, task}；列的 audio 為指令音訊，text 為指令文字。"""
    root = Path(root)
    src = root / filename
    if not src.is_file():
        raise UserFileError(f"{root}: 找不到 {filename}")
    probe = _Prober(skips, expected_sr)
    for lineno, line in _read_lines(src, skips):
        key = f"{src}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            skips.add(key, "bad_json", str(e))
            continue
        sp = rec.get("split", split)
        if not _want(sp, splits):
            continue
        wav = resolve_path(rec["instruction_audio"], root)
        info = probe(wav, key)
        if info is None:
            continue
        resp = rec.get("response_audio")
        resp_path = resolve_path(resp, root) if resp else None
        if resp_path is not None and probe(resp_path, key) is None:
            continue
        text = _clean(rec.get("instruction_text", ""))
        yield _row(
            rec.get("id", f"{src.stem}_{lineno}"),
            wav,
            info,
            text,
            rec.get("speaker", "unknown"),
            corpus,
            sp,
            instruction=text,
            response_text=rec.get("response_text"),
            response_audio=str(resp_path) if resp_path else None,
            task=rec.get("task", "speech_instruction"),
            emotion=rec.get("emotion"),
            response_style=rec.get("response_style"),
        )


@register_adapter("vad_truth")
def vad_truth(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "demo_longform",
    split: str = "train",
    splits: Any = None,
    expected_sr: int | None = None,
    **_: Any,
) -> Iterator[dict]:
    """示範語料的長檔（vad/vad_truth.json）：每段語音成為一個 turn，可供 VAD 切分後分配文字。"""
    root = Path(root)
    src = root / "vad_truth.json"
    if not src.is_file():
        raise UserFileError(f"{root}: 找不到 vad_truth.json")
    if not _want(split, splits):
        return
    probe = _Prober(skips, expected_sr)
    for vid, rec in json.loads(src.read_text("utf-8")).items():
        wav = resolve_path(rec["audio"], root)
        info = probe(wav, f"{src}:{vid}")
        if info is None:
            continue
        turns = [
            {"speaker": "S0002", "start": s, "end": e, "text": t, "kind": "utterance"}
            for (s, e), t in zip(rec["speech"], rec["texts"])
        ]
        text = fix_spaces(" ".join(rec["texts"]))
        yield _row(vid, wav, info, text, "S0002", corpus, split, turns=turns)


@register_adapter("libritts")
def libritts(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "libritts",
    splits: Any = None,
    subsets: Any = None,
    expected_sr: int | None = 24000,
    **_: Any,
) -> Iterator[dict]:
    """LibriTTS（openslr 60）：{subset}/{spk}/{chapter}/{spk}_{chapter}.trans.tsv（id、原文、正規化文）。"""
    probe = _Prober(skips, expected_sr)
    for tf, subset, split, lineno, line in _libri_lines(
        root, "LibriTTS", ".trans.tsv", skips, splits, subsets
    ):
        cols = line.split("\t")
        if len(cols) < 2:
            skips.add(f"{tf}:{lineno}", "bad_line", line[:80])
            continue
        uid, original = cols[0], cols[1]
        normalized = cols[2] if len(cols) > 2 else original
        wav = tf.parent / f"{uid}.wav"
        info = probe(wav, str(wav))
        if info is None:
            continue
        yield _row(
            uid,
            wav,
            info,
            normalized,
            uid.split("_")[0],
            corpus,
            split,
            language="en",
            text_raw=original,
            source_subset=subset,
        )


@register_adapter("kaldi")
def kaldi(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "kaldi",
    split: str | None = None,
    splits: Any = None,
    expected_sr: int | None = None,
    **_: Any,
) -> Iterator[dict]:
    """Kaldi 資料夾（KeSpeech、TALCS 等）：wav.scp、text，選用 utt2spk 與 segments。

    root 可為單一資料夾或其上層（每個含 wav.scp 的子資料夾視為一個切分，名稱作為 split）。
    wav.scp 只接受檔案路徑（不支援管線命令）；相對路徑以資料夾為準。
    """
    root = Path(root)
    dirs = (
        [root] if (root / "wav.scp").is_file() else sorted(p.parent for p in root.rglob("wav.scp"))
    )
    if not dirs:
        raise UserFileError(f"{root}: 找不到 wav.scp（Kaldi 資料夾格式）")
    probe = _Prober(skips, expected_sr)
    for d in dirs:
        sp = split or _libri_split(d.name)
        if not _want(sp, splits):
            continue

        def table(name: str, d: Path = d) -> dict[str, str]:
            f = d / name
            out: dict[str, str] = {}
            if f.is_file():
                for _, line in _read_lines(f, skips):
                    k, _, v = line.partition(" ")
                    out[k] = v.strip()
            return out

        wavs, texts, spk = table("wav.scp"), table("text"), table("utt2spk")
        segs = table("segments")
        utts = segs.keys() if segs else wavs.keys()
        for uid in sorted(utts):
            key = f"{d}:{uid}"
            if uid not in texts or not _clean(texts[uid]):
                skips.add(key, "no_transcript", uid)
                continue
            if segs:
                rec, b, e = segs[uid].split()[:3]
                b, e = float(b), float(e)
            else:
                rec, b, e = uid, 0.0, None
            if rec not in wavs or wavs[rec].endswith("|"):
                skips.add(key, "bad_line", f"wav.scp 沒有 {rec} 的檔案路徑")
                continue
            wav = resolve_path(wavs[rec], d)
            info = probe(wav, key)
            if info is None:
                continue
            if e is not None and not _segment_ok(info, b, e, key, skips):
                continue
            yield _row(
                uid,
                wav,
                info,
                _clean(texts[uid]),
                spk.get(uid, rec),
                corpus,
                sp,
                offset=b,
                duration=None if e is None else e - b,
                text_raw=texts[uid],
            )


@register_adapter("emilia")
def emilia(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "emilia",
    split: str = "train",
    splits: Any = None,
    expected_sr: int | None = None,
    languages: Any = None,
    **_: Any,
) -> Iterator[dict]:
    """Emilia（解開 webdataset tar 後）：每段 *.mp3 旁一個同名 JSON（id、text、speaker、language）。"""
    root = Path(root)
    if not _want(split, splits):
        return
    metas = sorted(root.rglob("*.json"))
    if not metas:
        raise UserFileError(f"{root}: 找不到 Emilia 的 JSON 標註")
    probe = _Prober(skips, expected_sr)
    for mp in metas:
        try:
            rec = json.loads(mp.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            skips.add(str(mp), "bad_json", str(e))
            continue
        if not isinstance(rec, dict) or "text" not in rec:
            continue
        lang = str(rec.get("language", "")).lower()
        if languages and lang not in languages:
            continue
        audio = mp.with_suffix(".mp3")
        if not audio.exists() and rec.get("wav"):
            audio = resolve_path(rec["wav"], mp.parent)
        info = probe(audio, str(mp))
        if info is None:
            continue
        text = _clean(rec["text"])
        if not text:
            skips.add(str(mp), "empty_text", "")
            continue
        yield _row(
            rec.get("id", mp.stem),
            audio,
            info,
            text,
            str(rec.get("speaker", "unknown")),
            corpus,
            split,
            source_language=lang or None,
            source_dnsmos=rec.get("dnsmos"),
        )


ESD_EMOTIONS = {
    "Neutral": "neutral",
    "Angry": "angry",
    "Happy": "happy",
    "Sad": "sad",
    "Surprise": "surprised",
}


def _read_text_any(path: Path) -> str:
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "utf-16", "gb18030"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise UnicodeDecodeError("utf-8", raw, 0, 1, f"{path}: 無法以 UTF-8／UTF-16／GB18030 解碼")


@register_adapter("esd")
def esd(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str = "esd",
    splits: Any = None,
    expected_sr: int | None = SAMPLE_RATE,
    **_: Any,
) -> Iterator[dict]:
    """ESD：{spk}/{spk}.txt（「0011_000001\t文字\t情緒」，編碼可能為 UTF-16 或 GB18030）與
    {spk}/{Emotion}/[train|evaluation|test/]*.wav；情緒取自資料夾名稱。

    沒有切分子資料夾時依官方規則：每種情緒 350 句中前 20 句為 dev、其後 30 句為 test、其餘 train。
    """
    root = Path(root)
    spk_dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.txt").is_file())
    if not spk_dirs:
        raise UserFileError(f"{root}: 找不到 ESD 說話人資料夾（{{spk}}/{{spk}}.txt）")
    probe = _Prober(skips, expected_sr)
    for sd in spk_dirs:
        tf = sd / f"{sd.name}.txt"
        try:
            content = _read_text_any(tf)
        except UnicodeDecodeError as e:
            skips.add(str(tf), "non_utf8", str(e))
            continue
        texts = {}
        for line in content.splitlines():
            cols = line.strip().split("\t")
            if len(cols) >= 2:
                texts[cols[0]] = cols[1]
        for wav in sorted(sd.glob("*/**/*.wav")):
            rel = wav.relative_to(sd).parts
            emotion = ESD_EMOTIONS.get(rel[0])
            if emotion is None:
                continue
            uid = wav.stem
            if len(rel) > 2 and rel[1] in ("train", "evaluation", "test"):
                sp = {"evaluation": "dev"}.get(rel[1], rel[1])
            else:
                idx = (int(uid.split("_")[-1]) - 1) % 350
                sp = "dev" if idx < 20 else "test" if idx < 50 else "train"
            if not _want(sp, splits):
                continue
            if uid not in texts:
                skips.add(str(wav), "no_transcript", uid)
                continue
            info = probe(wav, str(wav))
            if info is None:
                continue
            yield _row(uid, wav, info, _clean(texts[uid]), sd.name, corpus, sp, emotion=emotion)


@register_adapter("jsonl")
def jsonl(
    root: str | os.PathLike,
    skips: SkipCounter,
    corpus: str | None = None,
    splits: Any = None,
    filename: str | None = None,
    expected_sr: int | None = None,
    **_: Any,
) -> Iterator[dict]:
    """通用 JSONL 清單：root 為清單檔（或資料夾加 `filename`）；相對音訊路徑以清單所在處為準。"""
    src = Path(root) if filename is None else Path(root) / filename
    probe = _Prober(skips, expected_sr)
    for i, rec in enumerate(iter_manifest(src, skips)):
        key = f"{src}:{rec.get('id', i)}"
        if not rec.get("audio"):
            skips.add(key, "missing_field", "audio")
            continue
        wav = resolve_path(rec["audio"], src.parent)
        info = probe(wav, key)
        if info is None:
            continue
        rec = dict(rec)
        rec["audio"] = str(wav)
        rec.setdefault("offset", 0.0)
        rec.setdefault("duration", round(info["duration"] - rec["offset"], 4))
        rec.setdefault("sample_rate", info["sample_rate"])
        rec.setdefault("channels", info["channels"])
        if isinstance(rec.get("text"), str):
            rec.setdefault("language", language_of(rec["text"]))
        rec.setdefault("speaker", "unknown")
        rec.setdefault("split", "train")
        if corpus:
            rec["corpus"] = corpus
        if _want(rec["split"], splits):
            yield rec


def run_adapter(
    name: str, root: str | os.PathLike, skips: SkipCounter | None = None, **options: Any
) -> list[dict[str, Any]]:
    """跑一個轉接器並回傳所有列（略過的列記入 `skips`）。"""
    skips = SkipCounter() if skips is None else skips
    return list(get_adapter(name)(Path(root).resolve(), skips, **options))


def _full_check(row: dict[str, Any], check_options: dict[str, Any]) -> tuple[str, str] | None:
    """讀入整段音訊做內容檢查（削波、靜音、長度）。"""
    try:
        wave = load_audio(
            row["audio"], target_sr=None, offset=row["offset"], duration=row["duration"], mono=False
        )
    except AudioError as e:
        return e.reason, str(e)
    return check_audio_detail(wave, row["sample_rate"], **check_options)


def build_manifests(
    config: Any,
    output: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    only: list[str] | None = None,
    splits: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """依資料設定產生一份清單：逐語料跑轉接器、驗證、去重，寫出 `output` 與 `*.skipped.jsonl`。

    `config.corpora` 每項需有 name、adapter、root（相對於 `data_root` 或 `config.data_root`）；
    有 registry 欄且 `data_root/local_registry.json` 登記了該語料時，改用登記的路徑（加 subdir）。其餘欄位（splits、locale、expected_sr…）原樣傳給轉接器。`config.check_audio` 為 "header"
    （只讀標頭）或 "full"（另讀整段音訊檢查削波與靜音）。回傳摘要 dict。
    """
    cfg = _to_dict(config)
    base = Path(data_root if data_root is not None else cfg.get("data_root", "."))
    mode = cfg.get("check_audio", "header")
    check_opts = dict(cfg.get("check_options", {}) or {})
    skips = SkipCounter()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    per: dict[str, Counter] = defaultdict(Counter)
    hours: Counter = Counter()
    for spec in cfg.get("corpora", []):
        spec = dict(spec)
        name = spec.pop("name")
        if only and name not in only:
            continue
        adapter = spec.pop("adapter")
        reg_name, subdir = spec.pop("registry", None), spec.pop("subdir", None)
        local = read_local_registry(base).get(reg_name) if reg_name else None
        if local:
            root = Path(local["path"]) / (subdir or "")
            log(f"{name}：使用本機副本 {root}（{LOCAL_REGISTRY}）")
        else:
            root = resolve_path(spec.pop("root"), base).resolve()
        spec.pop("root", None)
        spec.setdefault("corpus", name)
        if splits:
            spec["splits"] = list(splits)
        before = len(skips)
        for row in get_adapter(adapter)(root, skips, **spec):
            key = f"{name}:{row.get('id')}"
            probs = validate_row(row)
            if probs:
                skips.add(key, getattr(probs[0], "reason", "invalid"), "; ".join(probs))
                continue
            if row["id"] in seen:
                skips.add(key, "duplicate_id", row["id"])
                continue
            if mode == "full":
                bad = _full_check(row, check_opts)
                if bad:
                    skips.add(key, bad[0], bad[1])
                    continue
            seen.add(row["id"])
            rows.append(row)
            per[name][row["split"]] += 1
            hours[name] += row["duration"] / 3600.0
        log(
            f"{name}（{adapter}）：{sum(per[name].values())} 列 {dict(per[name])}，"
            f"{hours[name]:.3f} 小時，略過 {len(skips) - before}"
        )
    out = Path(output)
    if cfg.get("relative_paths"):
        for row in rows:
            for k in ("audio", "response_audio"):
                if row.get(k):
                    row[k] = os.path.relpath(row[k], out.parent.resolve())
    n = write_manifest(out, rows)
    skipped_path = out.with_name(out.stem + ".skipped.jsonl")
    skips.write_jsonl(skipped_path)
    summary = {
        "output": str(out),
        "rows": n,
        "skipped": skips.report(),
        "per_corpus": {k: dict(v) for k, v in per.items()},
        "hours": {k: round(v, 4) for k, v in hours.items()},
        "skipped_file": str(skipped_path),
    }
    log(f"寫出 {n} 列到 {out}")
    log(skips.table())
    return summary


def _to_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def build_single(
    adapter: str,
    root: str | os.PathLike,
    output: str | os.PathLike,
    corpus: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """單一語料的捷徑（`--corpus NAME --root DIR`）。"""
    spec = {"name": corpus or adapter, "adapter": adapter, "root": str(Path(root).resolve())}
    spec.update(options)
    return build_manifests({"corpora": [spec]}, output, log=print)
