"""真實語料登錄表與下載：來源、授權、條款、大小、目錄格式（轉接器名稱）。

下載先印出授權與條款；需申請或僅限非商業用途的語料必須加 `accept_terms=True`。
HTTP 下載可續傳（`.part` 檔加 Range 標頭）並驗證校驗碼；沒有網路時在連線檢查（預設 3 秒）
立即失敗並說明如何改用 `--local NAME=DIR` 註冊本機已有的副本（寫入輸出資料夾的
`local_registry.json`，`build_manifests` 會優先使用它）。需同意條款的 Hugging Face 語料以
`HF_TOKEN`（環境變數，或目前資料夾／專案根目錄的 `.env`，見 `.env.example`）存取；權杖只交給
`huggingface_hub`，從不印出或寫入紀錄。`demo` 語料不連網，直接以 espeak-ng 生成在輸出資料夾。
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dotenv import dotenv_values
from huggingface_hub import snapshot_download

from speakllm_jax.cli import UserFileError, UserValueError, suggest
from speakllm_jax.data.demo_corpus import DEMO_DIR, ensure_demo_corpus

LOCAL_REGISTRY = "local_registry.json"
HF_TOKEN_ENV = "HF_TOKEN"
ENV_FILE = ".env"
_REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("url", "hf", "tfds", "manual", "demo")


@dataclass(frozen=True)
class Resource:
    """一個可下載的檔案；`checksum` 為 "md5:…" 或 "sha256:…"（未公布則為 None）。"""

    url: str
    checksum: str | None = None
    extract: bool = True

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name


@dataclass(frozen=True)
class CorpusSpec:
    """一個語料的登錄資料。`layout` 為 `speakllm_jax.data.adapters.ADAPTERS` 中的轉接器名稱。"""

    name: str
    title: str
    source: str
    languages: tuple[str, ...]
    tasks: tuple[str, ...]
    license: str
    homepage: str
    size: str
    layout: str
    non_commercial: bool = False
    gated: bool = False
    terms: str = ""
    resources: tuple[Resource, ...] = ()
    hf_id: str | None = None
    hf_config: str | None = None
    tfds_name: str | None = None
    nested_archives: tuple[str, ...] = ()
    notes: str = ""

    @property
    def requires_acceptance(self) -> bool:
        """需申請、非商業或授權未確認的語料都要使用者明確同意條款。"""
        return self.gated or self.non_commercial or "未確認" in self.license

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requires_acceptance"] = self.requires_acceptance
        return d


def _openslr(n: int, *files: tuple[str, str | None]) -> tuple[Resource, ...]:
    return tuple(Resource(f"https://www.openslr.org/resources/{n}/{f}", c) for f, c in files)


_CV_TERMS = (
    "Common Voice 條款：不得嘗試辨識錄音者身分；Hugging Face 上需登入並同意條款。"
    "2025 年起 Mozilla 將新版本移到 Mozilla Data Collective，Hub 上的舊版可能已下架，"
    "可自官方網站下載 cv-corpus-*.tar.gz 後以 --local 註冊。"
)

CORPORA: tuple[CorpusSpec, ...] = (
    CorpusSpec(
        "aishell1",
        "AISHELL-1",
        "url",
        ("zh",),
        ("asr",),
        "Apache-2.0",
        "https://www.openslr.org/33/",
        "15 GB（178 小時，400 位說話人，16 kHz）",
        "aishell1",
        resources=_openslr(
            33,
            ("data_aishell.tgz", "md5:2f494334227864a8a8fec932999db9d8"),
            ("resource_aishell.tgz", "md5:957d480a0fcac85fc18e550756f624e5"),
        ),
        nested_archives=("data_aishell/wav/*.tar.gz",),
        notes="解壓後 data_aishell/wav/ 下每位說話人一個 tar.gz，下載程式會再解開。",
    ),
    CorpusSpec(
        "aishell3",
        "AISHELL-3",
        "url",
        ("zh",),
        ("tts", "asr"),
        "Apache-2.0",
        "https://www.openslr.org/93/",
        "19 GB（85 小時，218 位說話人，44.1 kHz）",
        "aishell3",
        resources=_openslr(93, ("data_aishell3.tgz", None)),
        notes="content.txt 為漢字與帶調拼音交錯；多說話人 TTS。",
    ),
    CorpusSpec(
        "wenetspeech",
        "WenetSpeech",
        "manual",
        ("zh",),
        ("asr",),
        "CC BY 4.0（僅限非商業用途）",
        "https://wenet.org.cn/WenetSpeech/",
        "約 500 GB（10000+ 小時，opus 16 kHz）",
        "wenetspeech",
        non_commercial=True,
        gated=True,
        terms="需填寫申請表取得下載密碼；僅限非商業研究。",
        notes="以官方 download 腳本下載後，用 --local wenetspeech=DIR 註冊（DIR 內含 WenetSpeech.json）。",
    ),
    CorpusSpec(
        "kespeech",
        "KeSpeech",
        "manual",
        ("zh",),
        ("asr",),
        "需申請（僅限學術研究）",
        "https://github.com/KeSpeech/KeSpeech",
        "1542 小時（普通話與 8 種次方言）",
        "kaldi",
        non_commercial=True,
        gated=True,
        terms="需簽署授權協議後取得下載連結。",
        notes="Tasks/ASR/*/ 下為 Kaldi 格式（wav.scp、text、utt2spk）。",
    ),
    CorpusSpec(
        "magicdata_ramc",
        "MagicData-RAMC",
        "url",
        ("zh",),
        ("asr", "dialogue"),
        "CC BY-NC-ND 4.0",
        "https://www.openslr.org/123/",
        "15.5 GB（180 小時雙人對話，16 kHz）",
        "magicdata_ramc",
        non_commercial=True,
        resources=_openslr(123, ("MagicData-RAMC.tar.gz", None)),
        notes="MDT2021S003/WAV 與 TXT；每行 [起,訖] 說話人 性別,口音 文字；官方切分另附清單。",
    ),
    CorpusSpec(
        "commonvoice_zh_cn",
        "Common Voice zh-CN",
        "hf",
        ("zh",),
        ("asr",),
        "CC0-1.0",
        "https://commonvoice.mozilla.org/",
        "約 20 GB（zh-CN，版本 17.0）",
        "commonvoice",
        gated=True,
        terms=_CV_TERMS,
        hf_id="mozilla-foundation/common_voice_17_0",
        hf_config="zh-CN",
    ),
    CorpusSpec(
        "commonvoice_zh_tw",
        "Common Voice zh-TW",
        "hf",
        ("zh",),
        ("asr",),
        "CC0-1.0",
        "https://commonvoice.mozilla.org/",
        "約 3 GB（zh-TW，版本 17.0）",
        "commonvoice",
        gated=True,
        terms=_CV_TERMS,
        hf_id="mozilla-foundation/common_voice_17_0",
        hf_config="zh-TW",
        notes="句子為繁體並含全形標點；正規化時以 t2s／tw2s 轉為簡體。",
    ),
    CorpusSpec(
        "commonvoice_en",
        "Common Voice en",
        "hf",
        ("en",),
        ("asr",),
        "CC0-1.0",
        "https://commonvoice.mozilla.org/",
        "約 90 GB（en，版本 17.0）",
        "commonvoice",
        gated=True,
        terms=_CV_TERMS,
        hf_id="mozilla-foundation/common_voice_17_0",
        hf_config="en",
    ),
    CorpusSpec(
        "covost2",
        "CoVoST 2",
        "hf",
        ("zh", "en"),
        ("ast",),
        "CC BY-NC 4.0",
        "https://github.com/facebookresearch/covost",
        "翻譯標註（音訊取自 Common Voice 4.0）",
        "commonvoice",
        non_commercial=True,
        hf_id="facebook/covost2",
        hf_config="zh-CN_en",
        notes="音訊需另備 Common Voice 4.0；轉接器讀音訊與原文，翻譯在 covost_v2.*.tsv。",
    ),
    CorpusSpec(
        "talcs",
        "TALCS",
        "manual",
        ("mixed",),
        ("asr",),
        "需申請（僅限非商業研究）",
        "https://ai.100tal.com/dataset",
        "587 小時中英語碼轉換（線上教學）",
        "kaldi",
        non_commercial=True,
        gated=True,
        terms="需向好未來 AI 開放平台申請。",
        notes="以 Kaldi 格式（wav.scp、text）轉接。",
    ),
    CorpusSpec(
        "emilia",
        "Emilia",
        "hf",
        ("zh", "en"),
        ("tts",),
        "CC BY-NC 4.0（Emilia-YODAS 為 CC BY 4.0）",
        "https://emilia-dataset.github.io/Emilia-Demo-Page/",
        "約 2.4 TB（101k 小時，中文約 50k 小時）",
        "emilia",
        non_commercial=True,
        gated=True,
        hf_id="amphion/Emilia-Dataset",
        terms="Hugging Face 上需同意條款；Emilia 僅限非商業用途。",
        notes="webdataset tar：每段 mp3 配一個 JSON（id、text、speaker、language、duration）。",
    ),
    CorpusSpec(
        "librispeech",
        "LibriSpeech",
        "url",
        ("en",),
        ("asr",),
        "CC BY 4.0",
        "https://www.openslr.org/12/",
        "60 GB（1000 小時，16 kHz FLAC）",
        "librispeech",
        tfds_name="librispeech",
        resources=_openslr(
            12,
            ("train-clean-100.tar.gz", "md5:2a93770f6d5c6c964bc36631d331a522"),
            ("train-clean-360.tar.gz", "md5:c0e676e450a7ff2f54aeade5171606fa"),
            ("train-other-500.tar.gz", "md5:d1a0fd59409feb2c614ce4d30c387708"),
            ("dev-clean.tar.gz", "md5:42e2234ba48799c1f50f24a7926300a1"),
            ("dev-other.tar.gz", "md5:c8d0bcc9cca99d4f8b62fcc847357931"),
            ("test-clean.tar.gz", "md5:32fa31d27d2e1cad72775fee3f4849a9"),
            ("test-other.tar.gz", "md5:fb5a50374b501bb3bac4815ee91d3135"),
        ),
    ),
    CorpusSpec(
        "libritts",
        "LibriTTS",
        "url",
        ("en",),
        ("tts",),
        "CC BY 4.0",
        "https://www.openslr.org/60/",
        "約 80 GB（585 小時，24 kHz）",
        "libritts",
        resources=_openslr(
            60,
            ("train-clean-100.tar.gz", None),
            (
                "dev-clean.tar.gz",
                "sha256:da0864e1bd26debed35da8a869dd5c04dfc27682921936de7cff9c8a254dbe1a",
            ),
            ("test-clean.tar.gz", None),
        ),
    ),
    CorpusSpec(
        "esd",
        "Emotional Speech Dataset (ESD)",
        "manual",
        ("zh", "en"),
        ("emotion", "tts"),
        "ESD 授權（僅限研究，非商業）",
        "https://github.com/HLTSingapore/Emotional-Speech-Data",
        "約 29 小時（中英各 10 位說話人 × 5 種情緒，16 kHz）",
        "esd",
        non_commercial=True,
        gated=True,
        terms="需簽署授權書寄給作者後取得下載連結。",
    ),
    CorpusSpec(
        "voiceassistant_400k",
        "VoiceAssistant-400K",
        "hf",
        ("en",),
        ("speech_instruction",),
        "未確認：見資料集卡片",
        "https://huggingface.co/datasets/gpt-omni/VoiceAssistant-400K",
        "約 400k 筆語音問答（parquet）",
        "instructions",
        hf_id="gpt-omni/VoiceAssistant-400K",
        notes="parquet 需先轉成 instructions.jsonl（instruction_audio、response_text、response_audio）。",
    ),
    CorpusSpec(
        "instructs2s_200k",
        "InstructS2S-200K",
        "hf",
        ("en",),
        ("speech_instruction",),
        "未確認：見資料集卡片",
        "https://huggingface.co/datasets/ICTNLP/InstructS2S-200K",
        "約 200k 筆語音指令（LLaMA-Omni）",
        "instructions",
        hf_id="ICTNLP/InstructS2S-200K",
        notes="需先轉成 instructions.jsonl；指令音訊以 TTS 合成。",
    ),
    CorpusSpec(
        "demo",
        "內建示範語料（espeak-ng）",
        "demo",
        ("zh", "en", "mixed"),
        ("asr", "dialogue", "speech_instruction"),
        "MIT（本專案產生）",
        "https://github.com/espeak-ng/espeak-ng",
        "約 10 MB（scale=1）",
        "aishell1",
        notes=f"python data/make_demo_corpus.py --output_dir {DEMO_DIR}（或 download.py 離線生成）；"
        "含 AISHELL-1、Common Voice、雙聲道對話、語音指令與 VAD 標準答案等目錄。",
    ),
)
REGISTRY: dict[str, CorpusSpec] = {c.name: c for c in CORPORA}


def get_corpus(name: str) -> CorpusSpec:
    """依名稱取得語料登錄資料；未知名稱拋出 ValueError 並列出可用者。"""
    if name not in REGISTRY:
        raise UserValueError(
            f"未知的語料 {name!r}{suggest(name, REGISTRY)}；登錄表中有：{sorted(REGISTRY)}"
        )
    return REGISTRY[name]


def load_config(path: str | os.PathLike) -> Any:
    """載入 ml_collections 設定檔（Python 檔，需定義 `get_config()`）；`.yaml` 名稱會改找同名 `.py`。"""
    p = Path(path)
    if not p.is_file() and p.suffix in (".yaml", ".yml") and p.with_suffix(".py").is_file():
        p = p.with_suffix(".py")  # 種子文件的 configs/data/*.yaml 名稱對應到同名 .py
    if not p.is_file():
        raise UserFileError(f"--config {p}：設定檔不存在")
    root = str(p.resolve().parents[2])
    if (Path(root) / "configs").is_dir() and root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_datacfg_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise UserValueError(f"--config {p}：設定檔必須定義 get_config()")
    return mod.get_config()


# ---------------------------------------------------------------- 本機副本


def read_local_registry(output_dir: str | os.PathLike) -> dict[str, Any]:
    """讀取 `output_dir/local_registry.json`（不存在時為空 dict）。"""
    p = Path(output_dir) / LOCAL_REGISTRY
    if not p.is_file():
        return {}
    return json.loads(p.read_text("utf-8"))


def register_local(name: str, path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """把本機已有的語料副本登記到 `output_dir/local_registry.json`；回傳該 JSON 的路徑。"""
    spec = get_corpus(name)
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise UserFileError(f"--local {name}={path}：路徑不存在")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reg = read_local_registry(out)
    reg[name] = {
        "path": str(src),
        "layout": spec.layout,
        "license": spec.license,
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    p = out / LOCAL_REGISTRY
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(reg, ensure_ascii=False, indent=1), "utf-8")
    os.replace(tmp, p)
    return p


# ---------------------------------------------------------------- 下載


class DownloadError(RuntimeError):
    """下載失敗（離線、校驗碼不符、伺服器錯誤、未同意條款）。"""


def terms_text(spec: CorpusSpec) -> str:
    """下載前印出的授權與條款說明。"""
    lines = [
        f"== {spec.title}（{spec.name}）",
        f"   授權：{spec.license}{'（非商業）' if spec.non_commercial else ''}",
        f"   來源：{spec.source}  {spec.homepage}",
        f"   大小：{spec.size}",
    ]
    if spec.terms:
        lines.append(f"   條款：{spec.terms}")
    if spec.notes:
        lines.append(f"   備註：{spec.notes}")
    return "\n".join(lines)


def hf_token(env_file: str | os.PathLike | None = None) -> str | None:
    """Hugging Face 存取權杖：環境變數 `HF_TOKEN` 優先，其次 `env_file`（預設依序為目前資料夾與
    專案根目錄的 `.env`）。沒有時回傳 None。呼叫端只把值交給 `huggingface_hub`，不印出。"""
    tok = os.environ.get(HF_TOKEN_ENV, "").strip()
    if tok:
        return tok
    paths = [Path(env_file)] if env_file else [Path.cwd() / ENV_FILE, _REPO_ROOT / ENV_FILE]
    for path in paths:
        if path.is_file():
            tok = (dotenv_values(path).get(HF_TOKEN_ENV) or "").strip()
            if tok:
                return tok
    return None


def check_connectivity(url: str, timeout: float = 3.0) -> None:
    """以 socket 在 `timeout` 秒內連線主機；失敗立即拋出 `DownloadError`。"""
    u = urlparse(url)
    host = u.hostname
    port = u.port or (443 if u.scheme == "https" else 80)
    if not host:
        raise DownloadError(f"網址沒有主機名稱：{url}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise DownloadError(
            f"無法在 {timeout:g} 秒內連線 {host}:{port}（{e}）。此機器可能沒有網路；"
            f"請在有網路的機器下載，或以 --local NAME=DIR 註冊本機已有的副本。"
        ) from e


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, checksum: str | None) -> bool:
    """驗證 "md5:…"／"sha256:…" 校驗碼；checksum 為 None 時回傳 True。"""
    if not checksum:
        return True
    algo, _, want = checksum.partition(":")
    return _hash_file(Path(path), algo) == want.lower()


def download_file(
    url: str,
    dest: str | os.PathLike,
    checksum: str | None = None,
    timeout: float = 30.0,
    connect_timeout: float = 3.0,
    log: Callable[[str], None] = print,
) -> Path:
    """可續傳的 HTTP 下載：寫入 `dest.part`，已有部分時送 Range 標頭續傳，完成後驗證再改名。"""
    dest = Path(dest)
    if dest.is_file() and verify_checksum(dest, checksum):
        log(f"已存在且校驗通過：{dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_connectivity(url, connect_timeout)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "speakllm-jax-download"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # 已完整下載
            resp = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: 連線失敗（{e}）") from e
    if resp is not None:
        with resp:
            mode = "ab" if have and resp.status == 206 else "wb"
            if mode == "wb" and have:
                log(f"伺服器不支援續傳，重新下載 {url}")
            total = resp.headers.get("Content-Length")
            log(
                f"下載 {url} → {dest}（{'續傳自 ' + str(have) + ' 位元組，' if mode == 'ab' else ''}"
                f"本次 {total or '?'} 位元組）"
            )
            with part.open(mode) as f:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
    if not verify_checksum(part, checksum):
        bad = part.with_name(part.name + ".bad")
        os.replace(part, bad)
        raise DownloadError(f"{dest.name}: 校驗碼不符（預期 {checksum}）；檔案移到 {bad}")
    os.replace(part, dest)
    return dest


def extract_archive(path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """安全解壓 tar／tgz／zip（拒絕絕對路徑與跳出目錄的成員）。"""
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            for m in z.namelist():
                if Path(m).is_absolute() or ".." in Path(m).parts:
                    raise DownloadError(f"{path}: 不安全的成員路徑 {m}")
            z.extractall(out_dir)
        return
    with tarfile.open(path) as t:
        t.extractall(out_dir, filter="data")


def download_corpus(
    name: str,
    output_dir: str | os.PathLike,
    accept_terms: bool = False,
    dry_run: bool = False,
    connect_timeout: float = 3.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """下載一個語料到 `output_dir/NAME`；回傳動作摘要。`dry_run` 只印計畫、不連網。"""
    spec = get_corpus(name)
    log(terms_text(spec))
    # 示範語料本身就是一整個 data_root（內含多個語料的目錄格式），直接放在輸出資料夾。
    target = Path(output_dir) if spec.source == "demo" else Path(output_dir) / name
    plan: dict[str, Any] = {
        "name": name,
        "source": spec.source,
        "target": str(target),
        "files": [r.url for r in spec.resources],
    }
    need = spec.requires_acceptance and not accept_terms
    if dry_run:
        log(
            f"   （dry run）將下載到 {target}：{plan['files'] or spec.hf_id or spec.tfds_name or '手動'}"
            + ("；需要 --accept_terms" if need else "")
        )
        plan["status"] = "dry_run"
        plan["needs_accept_terms"] = need
        return plan
    if need:
        raise DownloadError(
            f"{name}: 此語料需要同意條款（{spec.license}）；閱讀上方條款後加 --accept_terms"
        )
    if spec.source == "demo":
        ensure_demo_corpus(target)
        log(f"   示範語料離線生成（不連網）：{target}")
        plan["status"] = "generated"
        return plan
    if spec.source == "manual":
        raise DownloadError(
            f"{name}: 需手動取得（{spec.homepage}）；取得後以 --local {name}=DIR 註冊"
        )
    if spec.source == "url":
        for res in spec.resources:
            f = download_file(
                res.url,
                target / "archives" / res.filename,
                res.checksum,
                connect_timeout=connect_timeout,
                log=log,
            )
            if res.extract:
                log(f"解壓 {f.name}")
                extract_archive(f, target)
        for pattern in spec.nested_archives:
            for inner in sorted(target.glob(pattern)):
                extract_archive(inner, inner.parent)
        plan["status"] = "downloaded"
        return plan
    if spec.source == "hf":
        token = hf_token()
        if spec.gated and not token:
            raise DownloadError(
                f"{name}: 需要 Hugging Face 權杖：先在 https://huggingface.co/datasets/{spec.hf_id} "
                f"同意條款，再把 {HF_TOKEN_ENV} 寫進 .env（見 .env.example）或設成環境變數"
            )
        check_connectivity("https://huggingface.co", connect_timeout)
        kw: dict[str, Any] = {"token": token} if token else {}
        if spec.hf_config and spec.layout == "commonvoice":
            kw["allow_patterns"] = [f"*{spec.hf_config}*", "*.py", "*.md", "*.json"]
        snapshot_download(spec.hf_id, repo_type="dataset", local_dir=str(target), **kw)
        plan["status"] = "downloaded"
        return plan
    raise DownloadError(f"{name}: 未支援的來源 {spec.source}")


@dataclass
class DownloadReport:
    """多個語料的下載結果。"""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
