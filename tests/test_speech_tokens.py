"""Voila 語音碼抽取：以 save_pretrained 存出的小型隨機 EncodecModel（16 kHz、hop 640、碼本 2048）測試。"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.tokenizers.extract import extract_speech_tokens  # noqa: E402
from export.tokenizers.voila import (  # noqa: E402
    VoilaTokenizer,
    make_demo_voila_tokenizer,
    num_codebooks_for_bandwidth,
)
from speakllm_jax.audio.io import load_audio  # noqa: E402
from speakllm_jax.data.manifest import write_manifest  # noqa: E402
from speakllm_jax.data.speech_tokens import load_codes  # noqa: E402


@pytest.fixture(scope="module")
def voila_dir(tmp_path_factory):
    """官方 `EncodecModel` 資料夾格式的小型隨機 Voila-Tokenizer（碼本以資料初始化）。"""
    return make_demo_voila_tokenizer(tmp_path_factory.mktemp("voila") / "tok")


@pytest.fixture(scope="module")
def tok(voila_dir):
    return VoilaTokenizer(voila_dir)


@pytest.fixture(scope="module")
def tok64(voila_dir):
    """float64 版：補零批次與逐句逐位元相同，用於比對完整結果。"""
    return VoilaTokenizer(voila_dir, dtype="float64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, espeak_corpus):
    d = tmp_path_factory.mktemp("st")
    clips = [("cmn", "你好，今天天气很好。"), ("en-us", "Good morning."), ("cmn", "我们重新开始吧")]
    rows = espeak_corpus(d, clips)
    write_manifest(d / "m.jsonl", rows)
    return d


def test_bandwidth_to_codebooks(voila_dir, tok):
    from transformers import EncodecModel

    # Voila 官方 bandwidth 1.1 kbps：1100 / (11 位元 × 25 Hz) = 4 層
    assert num_codebooks_for_bandwidth(2048, 25, 1.1) == 4
    model = EncodecModel.from_pretrained(voila_dir)
    for bw in (1.1, 2.2, 0.55, 3.3):
        assert num_codebooks_for_bandwidth(
            2048, 25, bw
        ) == model.quantizer.get_num_quantizers_for_bandwidth(bw)
    assert tok.bandwidth == 1.1 and tok.num_codebooks == 4
    assert (tok.sample_rate, tok.frame_rate, tok.hop, tok.codebook_size) == (16000, 25, 640, 2048)
    assert VoilaTokenizer(voila_dir, bandwidth=2.2).num_codebooks == 8
    with pytest.raises(ValueError, match="target_bandwidths"):
        VoilaTokenizer(voila_dir, bandwidth=6.0)


def test_codes_shapes_batching_and_parity(corpus, tok, tok64):
    waves = [load_audio(corpus / f"s{i}.wav", target_sr=16000) for i in range(3)]
    waves.append(waves[1][:1000])  # 不是 640 倍數的短句
    codes = tok.encode(waves)
    for w, c in zip(waves, codes):
        assert c.shape == (4, math.ceil(len(w) / 640)) and c.dtype == np.int16
        assert c.min() >= 0 and c.max() < 2048
    assert len(np.unique(codes[0])) > 10  # 真的有在量化，不是常數
    # float64 下補零批次與逐句逐位元相同，且等於直接呼叫 transformers 的 EncodecModel.encode
    # （輸入補零到整數個框）；float32 只可能因浮點誤差在極少數近似等距的碼上不同。
    batch64 = tok64.encode(waves)
    for w, c, c64 in zip(waves, codes, batch64):
        np.testing.assert_array_equal(tok64.encode([w])[0], c64)
        padded = np.zeros(math.ceil(len(w) / 640) * 640)
        padded[: len(w)] = w
        with torch.no_grad():
            ref = tok64.model.encode(torch.from_numpy(padded)[None, None], bandwidth=1.1)
        np.testing.assert_array_equal(ref.audio_codes[0, 0].numpy(), c64)
        assert np.mean(c == c64) > 0.97
        np.testing.assert_array_equal(tok.encode([w])[0][0], c[0])  # 第一層 float32 也一致


def test_decode_length(tok, corpus):
    w = load_audio(corpus / "s1.wav", target_sr=16000)
    c = tok.encode([w])[0]
    audio = tok.decode_codes(c)
    assert audio.shape == (c.shape[1] * 640,) and audio.dtype == np.float32
    assert np.isfinite(audio).all()
    assert tok.decode_codes(c, num_samples=len(w)).shape == (len(w),)
    with pytest.raises(ValueError, match="形狀"):
        tok.decode_codes(c[:3])


@pytest.mark.parametrize("out_name", ["codes", "codes.npz"])
def test_extract_is_resumable_and_counts_bad_audio(tmp_path, corpus, tok64, out_name, capsys):
    tok = tok64
    out = tmp_path / out_name
    r1 = extract_speech_tokens(
        corpus / "m.jsonl", out, None, batch_size=2, speech_tokenizer=tok, progress=True
    )
    # 進度條在 stderr，逐句前進到清單的總列數。
    rows = len((corpus / "m.jsonl").read_text().splitlines())
    err = capsys.readouterr().err
    assert "抽取語音符號" in err and f"{rows}/{rows}" in err
    assert r1.encoded == 3 and r1.already_done == 0
    assert dict(r1.skips.counts) == {"corrupt": 1, "missing": 1}
    first = load_codes(out)
    assert sorted(first) == ["spk/s0", "spk/s1", "spk/s2"]
    for i in range(3):
        w = load_audio(corpus / f"s{i}.wav", target_sr=16000)
        np.testing.assert_array_equal(first[f"spk/s{i}"], tok.encode([w])[0])
    # 重跑：全部已完成，不重抽
    r2 = extract_speech_tokens(corpus / "m.jsonl", out, None, batch_size=2, speech_tokenizer=tok)
    assert r2.encoded == 0 and r2.already_done == 3
    # 模擬中斷：少了一句、留下半個暫存檔；續跑只補缺的那句，結果與一次跑完相同
    if out.suffix == ".npz":
        data = dict(np.load(out))
        data.pop("spk/s2")
        np.savez(out, **data)
        (tmp_path / ".codes.npz.123.tmp").write_bytes(b"PK\x03")
    else:
        (out / f"{next(p.stem for p in out.glob('spk_s2*.npy'))}.npy").unlink()
        (out / ".spk_s2.npy.123.tmp").write_bytes(b"\x93NUMPY")
    r3 = extract_speech_tokens(corpus / "m.jsonl", out, None, batch_size=2, speech_tokenizer=tok)
    assert r3.encoded == 1 and r3.already_done == 2
    again = load_codes(out)
    assert again.keys() == first.keys()
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])
    skips = out.parent / (out.name + ".skips.jsonl") if out.suffix else out / "skips.jsonl"
    reasons = sorted(json.loads(x)["reason"] for x in skips.read_text().splitlines())
    assert reasons == ["corrupt", "missing"]


def test_meta_mismatch_refuses_to_mix(tmp_path, corpus, voila_dir, tok):
    out = tmp_path / "codes"
    extract_speech_tokens(corpus / "m.jsonl", out, None, batch_size=4, speech_tokenizer=tok)
    with pytest.raises(ValueError, match="num_codebooks"):
        extract_speech_tokens(
            corpus / "m.jsonl", out, None, speech_tokenizer=VoilaTokenizer(voila_dir, bandwidth=2.2)
        )


def test_cli(tmp_path, corpus, voila_dir, capsys):
    from data.extract_speech_tokens import main
    from speakllm_jax.cli import run_cli

    out = tmp_path / "o"
    assert (
        main(
            [
                "--tokenizer",
                "voila",
                "--manifest",
                str(corpus / "m.jsonl"),
                "--output",
                str(out),
                "--checkpoint",
                str(voila_dir),
                "--batch_size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(load_codes(out)) == 3
    capsys.readouterr()
    assert (
        run_cli(
            main,
            [
                "--tokenizer",
                "cosyvoice2",
                "--manifest",
                str(corpus / "m.jsonl"),
                "--output",
                str(tmp_path / "c"),
                "--checkpoint",
                str(voila_dir),
            ],
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "CosyVoice2" in err and err.startswith("錯誤：--checkpoint")
