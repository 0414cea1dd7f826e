"""CosyVoice2 語音符號（S3Tokenizer v2）：s3tokenizer 版面的小型隨機權重、espeak-ng 真實語音。"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.tokenizers.cosyvoice2 import (  # noqa: E402
    CHECKPOINT_NAME,
    CONFIG_NAME,
    ONNX_NAME,
    S3_CODEBOOK_SIZE,
    S3CheckpointError,
    S3TokenizerV2,
    S3TokenizerV2Config,
    fsq_digits,
    fsq_index,
    make_demo_s3_tokenizer,
    s3_log_mel,
    save_random_s3tokenizer,
    tokens_for_samples,
)
from export.tokenizers.extract import extract_speech_tokens  # noqa: E402
from speakllm_jax.audio.io import load_audio  # noqa: E402
from speakllm_jax.data.manifest import write_manifest  # noqa: E402
from speakllm_jax.data.speech_tokens import load_codes  # noqa: E402

TINY = S3TokenizerV2Config.tiny()


@pytest.fixture(scope="module")
def s3_dir(tmp_path_factory):
    """s3tokenizer 版面（`speech_tokenizer_v2.pt` state dict）的小型隨機模型。"""
    return save_random_s3tokenizer(tmp_path_factory.mktemp("s3") / "tok", TINY, seed=0)


@pytest.fixture(scope="module")
def model(s3_dir):
    return S3TokenizerV2.from_checkpoint(s3_dir)


@pytest.fixture(scope="module")
def model64(s3_dir):
    return S3TokenizerV2.from_checkpoint(s3_dir, dtype="float64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, espeak_corpus):
    d = tmp_path_factory.mktemp("s3c")
    clips = [("cmn", "你好"), ("en-us", "Good morning, everyone."), ("cmn", "我们重新开始吧")]
    rows = espeak_corpus(d, clips)
    # 5 毫秒（80 個樣本）：短於梅爾反射補邊所需，應略過並記為 too_short。
    rows.append(dict(rows[0], id="tiny", duration=0.005))
    write_manifest(d / "m.jsonl", rows)
    return d


def _waves(corpus):
    return [load_audio(corpus / f"s{i}.wav", target_sr=16000) for i in range(3)]


def test_strict_load_and_clear_errors(tmp_path, s3_dir, model):
    state = torch.load(s3_dir / CHECKPOINT_NAME, weights_only=True)
    assert set(state) == set(TINY.param_shapes())
    assert "quantizer._codebook.project_down.weight" in state
    assert "encoder.blocks.1.attn.fsmn_block.weight" in state
    assert tuple(state["encoder.conv1.weight"].shape) == (128, 128, 3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # 沒有設定檔時由形狀推得大小（頭數依頭寬 64）
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(s3_dir / CHECKPOINT_NAME, bare / CHECKPOINT_NAME)
    assert S3TokenizerV2.from_checkpoint(bare).config == TINY
    # 鍵名錯誤：列出缺少與多出的鍵
    bad = dict(state)
    bad["encoder.blocks.0.attn.q.weight"] = bad.pop("encoder.blocks.0.attn.query.weight")
    torch.save(bad, bare / CHECKPOINT_NAME)
    with pytest.raises(S3CheckpointError) as e:
        S3TokenizerV2.from_checkpoint(bare)
    assert "encoder.blocks.0.attn.query.weight" in str(e.value)
    assert "encoder.blocks.0.attn.q.weight" in str(e.value)
    # 形狀不符
    bad = dict(state)
    bad["encoder.blocks.1.mlp.0.bias"] = torch.zeros(7)
    with pytest.raises(S3CheckpointError, match=r"encoder\.blocks\.1\.mlp\.0\.bias.*\(7,\)"):
        S3TokenizerV2(bad, TINY)
    # 資料夾只有官方 ONNX：提示轉換方式
    onnx_only = tmp_path / "onnx"
    onnx_only.mkdir()
    (onnx_only / ONNX_NAME).write_bytes(b"\x08\x01")
    with pytest.raises(S3CheckpointError, match="onnx2torch"):
        S3TokenizerV2.from_checkpoint(onnx_only)
    (bare / CHECKPOINT_NAME).write_bytes(b"not a torch file")
    with pytest.raises(S3CheckpointError, match="torch.load"):
        S3TokenizerV2.from_checkpoint(bare)
    # 直接給檔案路徑也可以；設定檔欄位錯誤時指出欄位
    assert S3TokenizerV2.from_checkpoint(s3_dir / CHECKPOINT_NAME).config == TINY
    shutil.copy(s3_dir / CHECKPOINT_NAME, bare / CHECKPOINT_NAME)
    (bare / CONFIG_NAME).write_text(json.dumps({"n_state": 128, "n_heads": 2}))
    with pytest.raises(S3CheckpointError, match="n_heads"):
        S3TokenizerV2.from_checkpoint(bare)


def test_log_mel_matches_librosa(corpus):
    librosa = pytest.importorskip("librosa")
    w = _waves(corpus)[1]
    # 獨立計算：librosa 的 STFT（中心化、反射補邊、週期 Hann）與 Slaney 梅爾濾波器
    spec = np.abs(librosa.stft(w, n_fft=400, hop_length=160, window="hann", pad_mode="reflect"))
    power = spec[:, :-1] ** 2
    mel = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128) @ power
    ref = np.log10(np.maximum(mel, 1e-10))
    ref = (np.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0
    ours = s3_log_mel(w)
    assert ours.shape == (128, len(w) // 160)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_one_second_gives_25_tokens(corpus, model):
    w = _waves(corpus)[0]  # espeak-ng cmn「你好」
    one = np.zeros(16000, np.float32)
    one[: min(16000, len(w))] = w[:16000]
    codes = model.encode([one])[0]
    assert abs(len(codes) - 25) <= 1 and len(codes) == tokens_for_samples(16000) == 25
    assert codes.min() >= 0 and codes.max() < S3_CODEBOOK_SIZE == 6561
    full = model.encode([w])[0]
    # 每秒 100 個梅爾框，兩次步幅 2：ceil(ceil(frames / 2) / 2)
    assert len(full) == tokens_for_samples(len(w)) == math.ceil(math.ceil(len(w) // 160 / 2) / 2)
    assert len(np.unique(full)) > 5  # 隨機權重下也不是常數


def test_fsq_index_math(corpus, model):
    w = _waves(corpus)[2]
    mel = s3_log_mel(w)
    with torch.inference_mode():
        hidden, lens = model.encode_hidden(mel[None], [mel.shape[1]])
        codes = model.quantize_hidden(hidden)[0].numpy()
    state = model.state_dict()
    wt = state["quantizer._codebook.project_down.weight"].numpy().astype(np.float64)
    bt = state["quantizer._codebook.project_down.bias"].numpy().astype(np.float64)
    proj = hidden[0].numpy().astype(np.float64) @ wt.T + bt
    expected = []
    for row in proj:
        digits = [int(round(float(np.tanh(v)) * 0.999)) + 1 for v in row]
        expected.append(sum(d * 3**i for i, d in enumerate(digits)))
    # 只比對離捨入邊界夠遠的值（float32 與 float64 在邊界上可能不同）
    margin = np.abs(np.abs(np.tanh(proj) * 0.999) - 0.5).min(axis=1) > 1e-4
    assert margin.mean() > 0.9
    np.testing.assert_array_equal(codes[margin], np.asarray(expected)[margin])
    assert int(lens[0]) == len(codes)
    # 三進位數字 ↔ 碼是 0..6560 的一對一對應
    all_digits = np.stack(np.meshgrid(*[np.arange(3)] * 8, indexing="ij"), -1).reshape(-1, 8)
    idx = fsq_index(all_digits)
    assert sorted(idx.tolist()) == list(range(6561))
    np.testing.assert_array_equal(fsq_digits(idx), all_digits)


def test_batched_equals_one_by_one(corpus, model, model64):
    waves = _waves(corpus)
    waves.append(waves[1][:4321])  # 不是 640 倍數的短句
    for m in (model, model64):
        batch = m.encode(waves)
        for w, c in zip(waves, batch):
            assert len(c) == tokens_for_samples(len(w))
            np.testing.assert_array_equal(c, m.encode([w])[0])
    # 長於 30 秒：切 30 秒視窗（重疊 4 秒），第一窗的前 28 秒碼與單獨編碼前 30 秒相同
    long = np.concatenate([waves[0], waves[1], waves[2]] * 12)[: 16000 * 33]
    mel = s3_log_mel(long)
    merged = model64.encode_mels([mel])[0]
    assert len(merged) == tokens_for_samples(len(long)) == 825
    head = model64.encode_mels([mel[:, :3000]])[0]
    np.testing.assert_array_equal(merged[:700], head[:700])
    tail = model64.encode_mels([mel[:, 2600:]])[0]
    np.testing.assert_array_equal(merged[700:], tail[50:])
    both = model64.encode_mels([mel, s3_log_mel(waves[0])])
    np.testing.assert_array_equal(both[0], merged)


def test_cli_resumable_and_skips(tmp_path, corpus, s3_dir, model, capsys):
    from data.extract_speech_tokens import main
    from speakllm_jax.cli import run_cli

    out = tmp_path / "codes"
    args = ["--tokenizer", "cosyvoice2", "--manifest", str(corpus / "m.jsonl")]
    args += ["--output", str(out), "--checkpoint", str(s3_dir), "--batch_size", "2"]
    assert main(args) == 0
    assert "新抽 3 句" in capsys.readouterr().out
    codes = load_codes(out)
    assert sorted(codes) == ["spk/s0", "spk/s1", "spk/s2"]
    for i, w in enumerate(_waves(corpus)):
        c = codes[f"spk/s{i}"]
        assert c.dtype == np.int16 and c.shape == (1, tokens_for_samples(len(w)))
        np.testing.assert_array_equal(c[0], model.encode([w])[0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "cosyvoice2" and meta["codebook_size"] == 6561
    reasons = sorted(
        json.loads(x)["reason"] for x in (out / "skips.jsonl").read_text().splitlines()
    )
    assert reasons == ["corrupt", "missing", "too_short"]
    # 中斷後續跑：只補缺的一句
    (out / f"{next(p.stem for p in out.glob('spk_s1*.npy'))}.npy").unlink()
    r = extract_speech_tokens(corpus / "m.jsonl", out, s3_dir, tokenizer="cosyvoice2")
    assert (r.encoded, r.already_done) == (1, 2)
    assert dict(r.skips.counts) == {"corrupt": 1, "missing": 1, "too_short": 1}
    again = load_codes(out)
    for k in codes:
        np.testing.assert_array_equal(again[k], codes[k])
    # 不同模型大小寫入同一輸出：拒絕混用
    other = save_random_s3tokenizer(tmp_path / "other", S3TokenizerV2Config.tiny(n_layer=1))
    with pytest.raises(ValueError, match="n_layer"):
        extract_speech_tokens(corpus / "m.jsonl", out, other, tokenizer="cosyvoice2")
    # 沒有權重的資料夾：CLI 回傳 2 並以一行說明
    args[args.index(str(s3_dir))] = str(tmp_path)
    capsys.readouterr()
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    assert CHECKPOINT_NAME in err and err.startswith("錯誤：--checkpoint") and err.count("\n") == 1


def test_demo_tokenizer_gives_varied_codes(tmp_path, corpus):
    d = make_demo_s3_tokenizer(tmp_path / "demo")
    assert (d / CHECKPOINT_NAME).is_file() and (d / CONFIG_NAME).is_file()
    m = S3TokenizerV2.from_checkpoint(d)
    a, b, c = m.encode(_waves(corpus))
    assert len(np.unique(np.concatenate([a, b, c]))) > 30
    assert make_demo_s3_tokenizer(tmp_path / "demo") == d  # 已存在則沿用


def test_parity_with_s3tokenizer_package(corpus, model, monkeypatch):
    """有安裝 s3tokenizer 套件時：同一份權重、同樣輸入，碼與官方 PyTorch 實作一致。

    `pip install --no-deps s3tokenizer` 即可執行：套件頂層會匯入的 onnx、torchaudio 只用於
    ONNX 轉換與讀檔，本測試用不到，缺少時以空模組佔位。
    """
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("s3tokenizer") is None:
        pytest.skip("未安裝 s3tokenizer")
    for dep in ("onnx", "torchaudio"):
        if importlib.util.find_spec(dep) is None and dep not in sys.modules:
            # 測試結束後移除，以免影響其他以 importorskip 判斷 onnx 的測試
            monkeypatch.setitem(sys.modules, dep, types.ModuleType(dep))
    s3 = pytest.importorskip("s3tokenizer")
    from s3tokenizer.model_v2 import ModelConfig
    from s3tokenizer.model_v2 import S3TokenizerV2 as Ref

    ref = Ref(
        "speech_tokenizer_v2_25hz",
        ModelConfig(n_mels=128, n_audio_state=128, n_audio_head=2, n_audio_layer=2),
    )
    for blk in ref.encoder.blocks:
        blk.attn_ln.eps = TINY.attn_ln_eps
    ref.load_state_dict(model.state_dict(), strict=True)
    waves = _waves(corpus)
    mels, lens = s3.padding([s3.log_mel_spectrogram(torch.from_numpy(w)) for w in waves])
    codes, code_lens = ref.quantize(mels, lens)
    ours = model.encode(waves)
    for i, c in enumerate(ours):
        r = codes[i, : int(code_lens[i])].numpy()
        assert len(r) == len(c) and np.mean(r == c) > 0.99


def test_prepare_demo_speech_cosyvoice2(tmp_path):
    """示範語料的助理聲道也能抽 CosyVoice2 碼；與 Voila 共用清單、分開存放。"""
    if shutil.which("espeak-ng") is None:
        pytest.skip("需要 espeak-ng")
    from export.tokenizers.extract import prepare_demo_speech
    from speakllm_jax.data.demo_data import duplex_paths
    from speakllm_jax.data.manifest import read_manifest

    paths = prepare_demo_speech(tmp_path, tokenizer="cosyvoice2")
    assert paths == duplex_paths(tmp_path, "cosyvoice2")
    assert paths["dialogue"] == duplex_paths(tmp_path)["dialogue"]
    assert paths["dialogue_codes"] != duplex_paths(tmp_path)["dialogue_codes"]
    for name in ("dialogue", "instructions"):
        rows = read_manifest(paths[name])
        codes = load_codes(paths[f"{name}_codes"])
        assert rows and sorted(codes) == sorted(r["id"] for r in rows)
        for r in rows:
            wave = load_audio(paths[name].parent / r["audio"], target_sr=16000, mono=False)
            c = codes[r["id"]]
            assert c.shape == (1, tokens_for_samples(wave.shape[-1])) and c.dtype == np.int16
            assert 0 <= c.min() and c.max() < S3_CODEBOOK_SIZE
    with pytest.raises(ValueError, match="cosyvoice3"):
        duplex_paths(tmp_path, "cosyvoice3")
