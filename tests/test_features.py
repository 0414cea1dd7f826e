"""Whisper 對數梅爾：與 `transformers.WhisperFeatureExtractor` 在真實 espeak-ng 語音上比對。"""

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import soxr
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from speakllm_jax.audio.features import (
    WhisperFrontend,
    frames_for_samples,
    log_mel_jnp,
    log_mel_np,
    mel_filters,
)

TOL = 1e-4
TEXTS = {"cmn": "你好，今天天气很好", "en-us": "Hello, the weather is very nice today."}


def _espeak(tmp_dir, voice: str, text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("需要 espeak-ng")
    out = tmp_dir / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True)
    audio, sr = sf.read(out, dtype="float64")
    return soxr.resample(audio, sr, 16000).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("espeak")
    clips = {voice: _espeak(d, voice, text) for voice, text in TEXTS.items()}
    clips["silence"] = np.zeros(16000, np.float32)
    return clips


@pytest.fixture(scope="module")
def extractors():
    return {n: WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


def _hf(fe, audio, pad):
    kw = {"padding": "max_length"} if pad else {"padding": "longest", "truncation": False}
    return fe(audio, sampling_rate=16000, return_tensors="np", **kw)["input_features"]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, ref.T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("clip", ["cmn", "en-us", "silence"])
@pytest.mark.parametrize("pad", [30.0, None])
def test_log_mel_matches_extractor(speech, extractors, n_mels, clip, pad):
    audio = speech[clip]
    ref = _hf(extractors[n_mels], audio, pad)[0]
    ours = log_mel_np(audio, n_mels, pad_to_seconds=pad)
    ours_j = np.asarray(log_mel_jnp(audio, n_mels, pad_to_seconds=pad))
    expected_frames = 3000 if pad else frames_for_samples(len(audio))
    assert ref.shape == ours.shape == ours_j.shape == (n_mels, expected_frames)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours_j - ref).max() <= TOL
    assert np.abs(ours_j - ours).max() <= TOL


def test_frames_for_samples_matches_extractor(extractors):
    rng = np.random.default_rng(0)
    for n in (16000, 16001, 16159, 16160, 4321):
        audio = rng.standard_normal(n).astype(np.float32) * 0.1
        ref = _hf(extractors[80], audio, None)
        assert ref.shape[-1] == frames_for_samples(n)
        assert log_mel_np(audio, 80, None).shape[-1] == frames_for_samples(n)


def test_truncates_long_audio(speech, extractors):
    long = np.tile(speech["cmn"], 40)[: 16000 * 31 + 77]
    ref = _hf(extractors[80], long, 30.0)[0]
    ours = log_mel_np(long, 80)
    assert ours.shape == (80, 3000)
    assert np.abs(ours - ref).max() <= TOL


def test_batched_jnp_clamps_per_example(speech):
    # 兩筆響度差很多：若最大值是整批共用，安靜的一筆會被截斷成不同的值。
    n = max(len(speech["cmn"]), len(speech["en-us"]))
    a = np.pad(speech["cmn"], (0, n - len(speech["cmn"])))
    b = np.pad(speech["en-us"] * 1e-3, (0, n - len(speech["en-us"])))
    batch = np.stack([a, b])
    out = np.asarray(jax.jit(lambda x: log_mel_jnp(x, 80, pad_to_seconds=None))(jnp.asarray(batch)))
    for i in range(2):
        single = log_mel_np(batch[i], 80, pad_to_seconds=None)
        assert np.abs(out[i] - single).max() <= TOL
    assert out[1].max() < out[0].max() - 0.5


@pytest.mark.parametrize("pad", [30.0, None])
@pytest.mark.parametrize("use_jax", [False, True])
def test_frontend_batch_matches_extractor(speech, extractors, pad, use_jax):
    waves = [speech["cmn"], speech["en-us"], speech["silence"][:8001]]
    kw = {"padding": "max_length"} if pad else {"padding": "longest", "truncation": False}
    ref = extractors[80](
        waves, sampling_rate=16000, return_tensors="np", return_attention_mask=True, **kw
    )
    feats, mask = WhisperFrontend(80, pad_to_seconds=pad, use_jax=use_jax)(waves)
    assert feats.shape == ref["input_features"].shape
    assert np.abs(feats - ref["input_features"]).max() <= TOL
    np.testing.assert_array_equal(mask, ref["attention_mask"].astype(bool))


def test_frontend_multiple_of_frames(speech):
    fe = WhisperFrontend(80, pad_to_seconds=None, pad_to_multiple_frames=100)
    feats, mask = fe([speech["cmn"], speech["en-us"][:5000]])
    assert feats.shape[-1] % 100 == 0
    assert feats.shape[-1] >= frames_for_samples(len(speech["cmn"]))
    assert mask[1].sum() == int(np.ceil(5000 / 160))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="太短"):
        log_mel_np(np.zeros(100, np.float32), 80, pad_to_seconds=None)
    with pytest.raises(ValueError, match="一維"):
        log_mel_np(np.zeros((2, 16000), np.float32), 80)
    with pytest.raises(ValueError, match="浮點"):
        log_mel_np(np.zeros(16000, np.int16), 80)
    with pytest.raises(ValueError, match="第 1 筆"):
        WhisperFrontend()([np.zeros(16000, np.float32), np.zeros((2, 5), np.float32)])


def test_incremental_log_mel_matches_log_mel_np_in_any_chunking() -> None:
    """任意切段餵入：框數與數值和整段 `log_mel_np` 相同（最大聲的段落在開頭時正規化也相同），
    且保留的樣本數有界。"""
    from speakllm_jax.audio.features import IncrementalLogMel

    rng = np.random.default_rng(0)
    for n in (16000, 12345, 401):
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        x[300:340] = 0.9
        ref = log_mel_np(x, pad_to_seconds=None)
        inc = IncrementalLogMel(80)
        parts, i = [], 0
        while i < n:
            k = int(rng.integers(1, 900))
            parts.append(inc.push(x[i : i + k]))
            i += k
            assert inc.buffered_samples < 400 + 900
        parts.append(inc.finish())
        got = np.concatenate(parts, axis=1)
        assert got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)


def test_features_import_loads_no_jax() -> None:
    """服務端（PyTorch）匯入梅爾前端時不載入 jax／flax。"""
    import sys

    code = (
        "import sys; import speakllm_jax.audio.features as f; f.IncrementalLogMel(80); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
