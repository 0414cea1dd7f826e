"""Whisper（NNX）與 transformers 在同一份權重上的數值比對、串流遮罩、檢查點讀寫與分片載入。"""

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from flax import nnx
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.models.whisper.modeling_whisper import sinusoids as torch_sinusoids

from speakllm_jax.checkpoints.hf_io import SafetensorsFolder, write_safetensors
from speakllm_jax.checkpoints.whisper_hf import (
    load_whisper,
    save_whisper,
    whisper_config_from_hf,
    whisper_config_to_hf,
)
from speakllm_jax.models.whisper import (
    Whisper,
    WhisperConfig,
    WhisperEncoder,
    count_params,
    encoder_output_frames,
    sinusoids,
    whisper_large_v3,
    whisper_medium,
)
from speakllm_jax.training.sharding import make_mesh

TOL = 1e-4
TINY = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "vocab_size": 120,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 3,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """以固定種子建立的小型 WhisperForConditionalGeneration（fp32），並擾動所有權重。"""
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(HFWhisperConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("encoder.embed_positions.weight"):
                continue  # 保留 transformers 計算的正弦位置表
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("hf") / "whisper_tiny"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """真實 espeak-ng 中文語音經 WhisperFeatureExtractor 得到的 3000 框特徵（批次 2）。"""
    if shutil.which("espeak-ng") is None:
        pytest.skip("需要 espeak-ng")
    d = tmp_path_factory.mktemp("wav")
    waves = []
    for voice, text in (("cmn", "你好，今天天气很好"), ("en-us", "Good morning everyone.")):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(d / "a.wav"), text], check=True)
        audio, sr = sf.read(d / "a.wav", dtype="float64")
        waves.append(soxr.resample(audio, sr, 16000).astype(np.float32))
    fe = WhisperFeatureExtractor(feature_size=80)
    return fe(waves, sampling_rate=16000, return_tensors="np")["input_features"]


@pytest.fixture(scope="module")
def jax_model(hf_dir):
    return load_whisper(hf_dir)


@pytest.fixture(scope="module")
def hf_outputs(hf_model, features):
    ids = torch.tensor(np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 9)))
    with torch.no_grad():
        x = torch.from_numpy(features)
        enc = hf_model.model.encoder(x).last_hidden_state.numpy()
        logits = hf_model(input_features=x, decoder_input_ids=ids).logits.numpy()
    return ids.numpy(), enc, logits


@nnx.jit(static_argnames=("chunk_frames",))
def _encode(model, x, attention_mask=None, chunk_frames=None):
    return model.encode(x, attention_mask=attention_mask, chunk_frames=chunk_frames)


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_encoder_matches_transformers(jax_model, features, hf_outputs):
    _, enc, _ = hf_outputs
    out = nnx.jit(lambda m, x: m.encode(x))(jax_model, jnp.asarray(features))
    assert out.shape == (2, 1500, TINY["d_model"])
    assert _maxdiff(out, enc) <= TOL


def test_decoder_logits_match_transformers(jax_model, features, hf_outputs):
    ids, enc, logits = hf_outputs
    ours = jax_model.decode(jnp.asarray(ids), jnp.asarray(enc))
    assert ours.shape == (2, 9, TINY["vocab_size"])
    assert _maxdiff(ours, logits) <= TOL
    full = jax_model(jnp.asarray(features), jnp.asarray(ids))
    assert _maxdiff(full, logits) <= TOL


def test_kv_cache_decode_equals_full(jax_model, hf_outputs):
    ids, enc, logits = hf_outputs
    cache = jax_model.init_cache(jnp.asarray(enc), max_length=16)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    first, cache = jax_model.decode_step(jnp.asarray(ids[:, :4]), cache)
    outs = [first]
    for t in range(4, ids.shape[1]):
        out, cache = step(jax_model, jnp.asarray(ids[:, t : t + 1]), cache)
        outs.append(out)
    assert int(cache.index) == ids.shape[1]
    assert _maxdiff(jnp.concatenate(outs, axis=1), logits) <= TOL


def test_unscanned_and_remat_match(hf_dir, jax_model, features):
    x = jnp.asarray(features[:, :, :200])
    ref = _encode(jax_model, x)
    remat = load_whisper(hf_dir, remat="full")
    for other in (load_whisper(hf_dir, scan_layers=False), remat):
        assert _maxdiff(_encode(other, x), ref) <= 1e-5

    # remat 下的梯度也必須與不重算時相同。
    @nnx.jit
    def grad(m, a):
        return nnx.grad(lambda mm: jnp.sum(mm.encode(a) ** 2))(m)

    g_ref = grad(jax_model, x)
    g_remat = grad(remat, x)
    a = g_ref["encoder"]["layers"]["fc1"]["kernel"][...]
    b = g_remat["encoder"]["layers"]["fc1"]["kernel"][...]
    assert _maxdiff(a, b) <= 1e-4


def test_short_input_and_limits(jax_model, features):
    out = jax_model.encode(jnp.asarray(features[:, :, :301]))
    assert out.shape == (2, encoder_output_frames(301), TINY["d_model"]) == (2, 151, 64)
    with pytest.raises(ValueError, match="max_source_positions"):
        jax_model.encode(jnp.zeros((1, 80, 3002)))
    with pytest.raises(ValueError, match="input_features"):
        jax_model.encode(jnp.zeros((1, 128, 100)))


def test_chunked_mask_is_causal_per_chunk(jax_model, features):
    c = 25  # 輸出框；第一塊依賴的梅爾框為 0..2c（卷積的前瞻）
    x = jnp.asarray(features[:1, :, :400])
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, 80, 400)), jnp.float32)
    later = x.at[:, :, 2 * c + 1 :].set(noise[:, :, 2 * c + 1 :])
    a = _encode(jax_model, x, chunk_frames=c)
    b = _encode(jax_model, later, chunk_frames=c)
    assert _maxdiff(a[:, :c], b[:, :c]) <= 1e-5
    assert _maxdiff(a[:, c:], b[:, c:]) > 1e-2
    # 不分塊時，後面的音訊會改變前面的輸出（確認上面的比較有鑑別力）。
    assert _maxdiff(_encode(jax_model, x)[:, :c], _encode(jax_model, later)[:, :c]) > 1e-3
    # 一塊涵蓋全部框 = 完整注意力。
    full = _encode(jax_model, x)
    assert _maxdiff(_encode(jax_model, x, chunk_frames=200), full) <= 1e-6
    assert _maxdiff(_encode(jax_model, x, chunk_frames=10_000), full) <= 1e-6


def test_attention_mask_ignores_padding(jax_model, features):
    short = jnp.asarray(features[:1, :, :240])
    padded = jnp.pad(short, ((0, 0), (0, 0), (0, 160)))
    padded = padded.at[:, :, 240:].set(0.0)
    mask = jnp.arange(400)[None, :] < 240
    ref = _encode(jax_model, short)
    out = _encode(jax_model, padded, mask)
    assert _maxdiff(out[:, :120], ref) <= 1e-5
    with pytest.raises(ValueError, match="attention_mask"):
        jax_model.encode(padded, attention_mask=mask[:, :10])


def test_save_roundtrip_transformers(tmp_path, jax_model, hf_model):
    out = save_whisper(jax_model, tmp_path / "full")
    reloaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    ref = hf_model.state_dict()
    got = reloaded.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        np.testing.assert_array_equal(got[k].numpy(), ref[k].numpy(), err_msg=k)
    assert reloaded.config.d_model == TINY["d_model"]
    assert reloaded.config.decoder_start_token_id == TINY["decoder_start_token_id"]
    # WhisperModel（無 lm head）也能讀同一資料夾，而我們也能讀回 WhisperModel 的佈局。
    base = WhisperModel.from_pretrained(out)
    base.save_pretrained(tmp_path / "base")
    again = load_whisper(tmp_path / "base")
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(again)), nnx.to_flat_state(nnx.state(jax_model))
    ):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))


def test_encoder_only_load_and_save(tmp_path, hf_dir, jax_model, hf_model, features):
    enc = load_whisper(hf_dir, encoder_only=True)
    assert isinstance(enc, WhisperEncoder)
    x = jnp.asarray(features[:, :, :300])
    assert _maxdiff(_encode(enc, x), _encode(jax_model, x)) <= 1e-6
    out = save_whisper(enc, tmp_path / "enc")
    hf_enc = HFWhisperEncoder.from_pretrained(out).eval()
    ref = hf_model.model.encoder.state_dict()
    for k, v in hf_enc.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref[k].numpy(), err_msg=k)
    back = load_whisper(out, encoder_only=True)
    assert _maxdiff(_encode(back, x), _encode(enc, x)) == 0.0
    with pytest.raises(ValueError, match="encoder_only"):
        load_whisper(out)


def test_mesh_load_equals_single_device(hf_dir, jax_model, features):
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_whisper(hf_dir, mesh=mesh)
    flat = dict(nnx.to_flat_state(nnx.state(sharded)))
    kernel = flat[("encoder", "layers", "fc1", "kernel")].get_value()
    assert len(kernel.sharding.device_set) == 8
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for p, v in nnx.to_flat_state(nnx.state(jax_model)):
        np.testing.assert_array_equal(
            np.asarray(flat[p].get_value()), np.asarray(v.get_value()), err_msg=str(p)
        )
    x = jnp.asarray(features[:, :, :200])
    out = nnx.jit(lambda m, a: m.encode(a))(sharded, x)
    assert _maxdiff(out, _encode(jax_model, x)) <= 1e-5


def test_medium_encoder_param_count():
    cfg = whisper_medium()
    with torch.device("meta"):
        ref = HFWhisperEncoder(HFWhisperConfig(**whisper_config_to_hf(cfg)))
    expected = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(lambda: WhisperEncoder(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected
    assert abs(expected / 1e9 - 0.307) < 0.001


def test_config_roundtrip_and_presets():
    for cfg in (whisper_medium(), whisper_large_v3()):
        hf = HFWhisperConfig(**whisper_config_to_hf(cfg))
        again = whisper_config_from_hf(hf.to_dict())
        for name in ("num_mel_bins", "d_model", "encoder_layers", "decoder_ffn_dim", "vocab_size"):
            assert getattr(again, name) == getattr(cfg, name)
        assert whisper_config_to_hf(again)["decoder_start_token_id"] == 50258
    v3 = whisper_large_v3()
    assert (v3.num_mel_bins, v3.d_model, v3.encoder_layers, v3.encoder_attention_heads) == (
        128,
        1280,
        32,
        20,
    )
    assert whisper_config_to_hf(whisper_large_v3())["pad_token_id"] == 50256
    assert (
        whisper_config_to_hf(whisper_medium(param_dtype=jnp.dtype("bfloat16")))["dtype"]
        == "bfloat16"
    )
    with pytest.raises(ValueError, match="model_type"):
        whisper_config_from_hf({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="d_model"):
        WhisperConfig(d_model=65, encoder_attention_heads=4)


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    folder = SafetensorsFolder(src)
    tensors = {k: np.array(folder.get(k)) for k in folder.keys()}
    edit(tensors)
    (dst / "model.safetensors").unlink()
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_bad_checkpoint_errors_name_key(tmp_path, hf_dir):
    key = "model.encoder.layers.1.fc1.weight"
    missing = _rewrite(hf_dir, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_whisper(missing)

    def reshape(t):
        t[key] = t[key][:, :10]

    bad_shape = _rewrite(hf_dir, tmp_path / "shape", reshape)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*形狀不符"):
        load_whisper(bad_shape)

    def extra(t):
        t["model.encoder.surprise.weight"] = np.zeros(3, np.float32)

    unexpected = _rewrite(hf_dir, tmp_path / "extra", extra)
    with pytest.raises(ValueError, match=r"model\.encoder\.surprise\.weight"):
        load_whisper(unexpected)

    def untied(t):
        t["proj_out.weight"] = t["model.decoder.embed_tokens.weight"] + 1.0

    with pytest.raises(ValueError, match=r"proj_out\.weight"):
        load_whisper(_rewrite(hf_dir, tmp_path / "untied", untied))


def test_sinusoids_match_transformers_table(hf_dir):
    stored = SafetensorsFolder(hf_dir).get("model.encoder.embed_positions.weight")
    assert _maxdiff(sinusoids(1500, TINY["d_model"]), stored) <= 1e-6
    big = torch_sinusoids(1500, 1024).numpy()
    # 參考以 float32 算角度：位置 1500 附近 float32 的間距約 1.2e-4，sin 的差也就到這個量級。
    assert _maxdiff(sinusoids(1500, 1024), big) <= 1500 * 2.0**-23 * 1.5


def test_bfloat16_load_runs_close(hf_dir, jax_model, features):
    x = jnp.asarray(features[:, :, :200])
    bf = load_whisper(hf_dir, dtype=jnp.bfloat16)
    flat = dict(nnx.to_flat_state(nnx.state(bf)))
    assert flat[("encoder", "conv1", "kernel")].get_value().dtype == jnp.bfloat16
    out = _encode(bf, x)
    assert out.dtype == jnp.bfloat16
    ref = _encode(jax_model, x)
    assert _maxdiff(out, ref) <= 0.1 * float(jnp.abs(ref).max())


def test_random_init_builds(features):
    cfg = whisper_config_from_hf(TINY, remat="dots")
    model = Whisper(cfg, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, a, t: m(a, t))(
        model, jnp.asarray(features[:1, :, :100]), jnp.zeros((1, 3), jnp.int32)
    )
    assert out.shape == (1, 3, TINY["vocab_size"])
    assert np.isfinite(np.asarray(out)).all()
