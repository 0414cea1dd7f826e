"""CosyVoice2 HiFT 聲碼器：官方鍵格式嚴格載入、兩種權重正規化命名、輸出長度、激發源快取與權重正規化。"""

from __future__ import annotations

import math

import pytest
import torch

from export.cosyvoice2.hift import (
    HIFT_OFFICIAL,
    HIFT_TINY,
    SOURCE_CACHE_LEN,
    HiFTGenerator,
    load_hift,
    parametrized_to_legacy,
    save_random_hift,
    weight_norm_naming,
)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """同一種子存兩份隨機 tiny hift.pt：新式（官方）與舊式權重正規化命名。"""
    root = tmp_path_factory.mktemp("hift")
    param_path = root / "hift.pt"
    legacy_path = root / "hift_legacy.pt"
    save_random_hift(param_path, HIFT_TINY, seed=11)
    save_random_hift(legacy_path, HIFT_TINY, seed=11, legacy_weight_norm=True)
    return {"param": param_path, "legacy": legacy_path}


@pytest.fixture(scope="module")
def tiny_model(tiny_files: dict[str, object]) -> HiFTGenerator:
    return load_hift(tiny_files["param"], HIFT_TINY)


def _mel(frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(seed))


def test_official_config_matches_official_file_layout() -> None:
    # 官方 CosyVoice2-0.5B hift.pt：328 個張量、20,821,295 個參數（獨立移植專案對實檔的統計）。
    state = HiFTGenerator(**HIFT_OFFICIAL).state_dict()
    assert len(state) == 328
    assert sum(v.numel() for v in state.values()) == 20_821_295
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["conv_pre.parametrizations.weight.original0"] == (512, 1, 1)
    assert shapes["conv_pre.parametrizations.weight.original1"] == (512, 80, 7)
    assert shapes["ups.0.parametrizations.weight.original1"] == (512, 256, 16)
    assert shapes["ups.2.parametrizations.weight.original1"] == (128, 64, 7)
    assert shapes["source_downs.0.weight"] == (256, 18, 30)
    assert shapes["source_downs.1.weight"] == (128, 18, 6)
    assert shapes["source_downs.2.weight"] == (64, 18, 1)
    assert shapes["m_source.l_linear.weight"] == (1, 9)
    assert shapes["f0_predictor.condnet.8.parametrizations.weight.original1"] == (512, 512, 3)
    assert shapes["f0_predictor.classifier.weight"] == (1, 512)
    assert shapes["resblocks.8.activations2.2.alpha"] == (64,)


def test_tiny_file_loads_strictly_in_both_namings(tiny_files: dict[str, object]) -> None:
    param_state = torch.load(tiny_files["param"], weights_only=True)
    legacy_state = torch.load(tiny_files["legacy"], weights_only=True)
    assert weight_norm_naming(param_state) == "parametrizations"
    assert weight_norm_naming(legacy_state) == "legacy"
    model = HiFTGenerator(**HIFT_TINY)
    assert set(param_state) == set(model.state_dict())
    model.load_state_dict(param_state, strict=True)

    a = load_hift(tiny_files["param"], HIFT_TINY)
    b = load_hift(tiny_files["legacy"], HIFT_TINY)
    assert not a.training and not b.training
    mel = _mel(30, seed=1)
    wav_a, src_a = a.inference(mel, seed=5)
    wav_b, src_b = b.inference(mel, seed=5)
    torch.testing.assert_close(wav_a, wav_b, rtol=0, atol=0)
    torch.testing.assert_close(src_a, src_b, rtol=0, atol=0)


def test_generator_prefix_is_stripped(tiny_files: dict[str, object], tmp_path) -> None:
    # 官方訓練包裝 HiFiGan 存檔時鍵帶 `generator.` 前綴，官方載入時會去掉。
    state = torch.load(tiny_files["param"], weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({f"generator.{k}": v for k, v in state.items()}, path)
    model = load_hift(path, HIFT_TINY)
    torch.testing.assert_close(model.conv_pre.bias.detach(), state["conv_pre.bias"])


def test_wrong_key_or_shape_is_reported(tiny_files: dict[str, object], tmp_path) -> None:
    state = torch.load(tiny_files["param"], weights_only=True)

    renamed = dict(state)
    renamed["conv_post.extra"] = renamed.pop("conv_post.bias")
    path = tmp_path / "renamed.pt"
    torch.save(renamed, path)
    with pytest.raises(ValueError, match="conv_post.bias") as err:
        load_hift(path, HIFT_TINY)
    assert "conv_post.extra" in str(err.value) and str(path) in str(err.value)

    reshaped = dict(state)
    reshaped["source_downs.0.weight"] = torch.zeros(3, 18, 30)
    path = tmp_path / "reshaped.pt"
    torch.save(reshaped, path)
    with pytest.raises(ValueError, match=r"source_downs\.0\.weight.*\(3, 18, 30\)"):
        load_hift(path, HIFT_TINY)

    # 設定與檔案不符（官方設定讀 tiny 檔）也要指出形狀不符的鍵。
    with pytest.raises(ValueError, match="conv_pre.parametrizations.weight.original1"):
        load_hift(tiny_files["param"], HIFT_OFFICIAL)

    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="狀態字典"):
        load_hift(path, HIFT_TINY)


def test_bad_config_and_input_are_rejected(tiny_model: HiFTGenerator) -> None:
    with pytest.raises(ValueError, match="upsample_kernel_sizes"):
        HiFTGenerator(**{**HIFT_TINY, "upsample_kernel_sizes": (16, 11)})
    with pytest.raises(ValueError, match="sinegen_type"):
        HiFTGenerator(**{**HIFT_TINY, "sinegen_type": "3"})
    with pytest.raises(ValueError, match="speech_feat"):
        tiny_model.inference(torch.zeros(1, 81, 10))


def test_100_frames_give_two_seconds(tiny_model: HiFTGenerator) -> None:
    wav, source = tiny_model.inference(_mel(100, seed=2, batch=2), seed=0)
    assert wav.shape == (2, 48000)
    assert source.shape == (2, 1, 48000)
    assert wav.shape[-1] / tiny_model.sampling_rate == 2.0
    assert torch.isfinite(wav).all() and torch.isfinite(source).all()
    assert wav.abs().max() <= 0.99
    assert wav.std() > 1e-3  # 不是靜音


def test_seed_makes_output_deterministic(tiny_model: HiFTGenerator) -> None:
    mel = _mel(20, seed=3)
    w1, s1 = tiny_model.inference(mel, seed=42)
    w2, s2 = tiny_model.inference(mel, generator=torch.Generator().manual_seed(42))
    w3, s3 = tiny_model.inference(mel, seed=43)
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.equal(s1, s3)  # 噪聲取自不同種子
    with pytest.raises(ValueError, match="generator"):
        tiny_model.inference(mel, seed=1, generator=torch.Generator())


def test_cache_source_continues_previous_chunk(tiny_model: HiFTGenerator) -> None:
    # 仿官方串流：上一塊保留最後 8 個梅爾幀與 3840 點激發源，下一塊把它們接在前面。
    first_mel = _mel(40, seed=4)
    _, first_source = tiny_model.inference(first_mel, seed=1)
    cache = first_source[:, :, -SOURCE_CACHE_LEN:]
    second_mel = torch.cat([first_mel[:, :, -8:], _mel(30, seed=5)], dim=2)

    wav, source = tiny_model.inference(second_mel, cache_source=cache, seed=2)
    assert source.shape == (1, 1, 38 * 480) and wav.shape == (1, 38 * 480)
    torch.testing.assert_close(source[:, :, :SOURCE_CACHE_LEN], cache, rtol=0, atol=0)

    # 快取之後的激發源與不帶快取時相同（同種子），快取確實改變了輸出波形。
    wav_plain, source_plain = tiny_model.inference(second_mel, seed=2)
    torch.testing.assert_close(
        source[:, :, SOURCE_CACHE_LEN:], source_plain[:, :, SOURCE_CACHE_LEN:], rtol=0, atol=0
    )
    assert not torch.equal(source_plain[:, :, :SOURCE_CACHE_LEN], cache)
    assert not torch.allclose(wav, wav_plain)

    with pytest.raises(ValueError, match="cache_source"):
        tiny_model.inference(_mel(2, seed=6), cache_source=cache)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weight_norm_matches_torch(tiny_files: dict[str, object]) -> None:
    model = load_hift(tiny_files["param"], HIFT_TINY)
    legacy_state = torch.load(tiny_files["legacy"], weights_only=True)
    x = torch.randn(2, 80, 13)

    # 以舊式 torch.nn.utils.weight_norm 包裝的同形模組讀入同一組 g、v，輸出應一致。
    ref_pre = torch.nn.utils.weight_norm(torch.nn.Conv1d(80, 32, 7, padding=3))
    ref_pre.load_state_dict(
        {k[len("conv_pre.") :]: v for k, v in legacy_state.items() if k.startswith("conv_pre.")}
    )
    torch.testing.assert_close(model.conv_pre(x), ref_pre(x))

    # 轉置卷積的權重正規化沿第 0 維（輸入通道）計算。
    h = torch.randn(2, 32, 13)
    ref_up = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(32, 16, 16, 8, padding=4))
    ref_up.load_state_dict(
        {k[len("ups.0.") :]: v for k, v in legacy_state.items() if k.startswith("ups.0.")}
    )
    torch.testing.assert_close(model.ups[0](h), ref_up(h))
    g = legacy_state["ups.0.weight_g"]
    v = legacy_state["ups.0.weight_v"]
    norm = v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(model.ups[0].weight, g * v / norm)

    # 折疊權重正規化後輸出不變，狀態字典改為一般的 weight 鍵。
    mel = _mel(12, seed=7)
    before, _ = model.inference(mel, seed=3)
    model.fold_weight_norm()
    after, _ = model.inference(mel, seed=3)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    keys = set(model.state_dict())
    assert "conv_pre.weight" in keys
    assert weight_norm_naming(model.state_dict()) == "none"
    assert parametrized_to_legacy({"a.parametrizations.weight.original1": g}) == {"a.weight_v": g}


@pytest.mark.parametrize("sinegen_type", ["1", "2"])
def test_sine_source_frequency_and_unvoiced_noise(sinegen_type: str) -> None:
    model = HiFTGenerator(**{**HIFT_TINY, "sinegen_type": sinegen_type})
    sine_gen = model.m_source.l_sin_gen
    sr = model.sampling_rate
    n = 40 * 480  # 0.8 秒
    f0 = torch.full((1, n, 1), 200.0)
    sines, uv, _ = sine_gen(f0, torch.Generator().manual_seed(0))
    assert sines.shape == (1, n, 9) and bool((uv == 1).all())
    freqs = torch.fft.rfftfreq(n, 1 / sr)
    for harmonic in (0, 1, 4):
        spectrum = torch.fft.rfft(sines[0, :, harmonic]).abs()
        peak = freqs[spectrum.argmax()].item()
        assert math.isclose(peak, 200.0 * (harmonic + 1), abs_tol=sr / n)
    assert math.isclose(sines[0, :, 0].abs().max().item(), 0.1, rel_tol=0.15)

    silent, uv0, _ = sine_gen(torch.zeros(1, n, 1), torch.Generator().manual_seed(0))
    assert bool((uv0 == 0).all())
    # 無聲段只有噪聲，標準差約為 sine_amp / 3。
    assert math.isclose(silent.std().item(), 0.1 / 3, rel_tol=0.05)
