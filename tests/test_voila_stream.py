"""Voila 串流解碼器（`export.tokenizers.voila_stream`）與 transformers 整段解碼逐樣本相同。

示範分詞器（上取樣 8·5·4·4、反射補邊）與一個隨機的非示範設定（上取樣 5·3·2·4、兩層 LSTM、
兩層殘差、不同核寬、無捷徑卷積）：整段一次、第一段夠長之後逐幀、從第一幀起逐幀（對照幀率卷積
改為補零的整段解碼）、短序列、批次裡列的加入／離開／重設。
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import EncodecConfig, EncodecModel

from export.serving.server import main as server_main
from export.tokenizers.voila import VoilaTokenizer, make_demo_voila_tokenizer
from export.tokenizers.voila_stream import VoilaStreamDecoder, VoilaStreamState
from speakllm_jax.cli import run_cli
from tests.voila_reference import frame_rate_constant, full_decode

TOL = 1e-5


def _random_model(pad_mode: str = "reflect", causal: bool = True) -> EncodecModel:
    cfg = EncodecConfig(
        sampling_rate=12000,
        upsampling_ratios=[5, 3, 2, 4],
        codebook_size=64,
        codebook_dim=8,
        hidden_size=8,
        num_filters=2,
        num_lstm_layers=2,
        num_residual_layers=2,
        kernel_size=5,
        last_kernel_size=3,
        residual_kernel_size=3,
        use_conv_shortcut=False,
        use_causal_conv=causal,
        normalize=False,
        pad_mode=pad_mode,
        target_bandwidths=[3.0],
    )
    torch.manual_seed(3)
    model = EncodecModel(cfg).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
    return model


def _stream(dec: VoilaStreamDecoder, codes: np.ndarray, sizes: list[int]) -> np.ndarray:
    st = dec.new_state(1)
    out, t = [], 0
    for n in sizes:
        wave = dec.decode(st, codes[None, :, t : t + n])
        assert wave.shape == (1, n * dec.hop)
        out.append(wave[0])
        t += n
    assert t == codes.shape[1]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    demo = VoilaTokenizer(make_demo_voila_tokenizer(tmp_path_factory.mktemp("voila") / "tok"))
    return {"demo": (demo.model, demo.num_codebooks), "random": (_random_model(), 3)}


@pytest.mark.parametrize("name", ["demo", "random"])
def test_stream_equals_full_decode(models, name) -> None:
    model, q = models[name]
    dec = VoilaStreamDecoder(model)
    size = model.config.codebook_size
    codes = np.random.default_rng(1).integers(0, size, (q, 24))
    ref = full_decode(model, codes)
    assert ref.shape == (24 * dec.hop,)
    # 整段一次。
    assert np.abs(_stream(dec, codes, [24]) - ref).max() <= TOL
    # 第一段夠長（開頭的反射只讀到這一段）之後逐幀、兩幀：含第一幀，與整段相同。
    s = dec.exact_start_frames
    assert s == model.config.kernel_size  # 幀率上的第一個卷積：反射補 k − 1 幀
    assert np.abs(_stream(dec, codes, [s] + [1] * (24 - s)) - ref).max() <= TOL
    assert np.abs(_stream(dec, codes, [s, 2, 1, 3] + [1] * (18 - s)) - ref).max() <= TOL
    # 從第一幀起逐幀：等同幀率卷積補零的整段解碼（其餘各層的反射照常）。
    one = _stream(dec, codes, [1] * 24)
    assert np.abs(one - full_decode(frame_rate_constant(model), codes)).max() <= TOL
    # 與反射的整段只差在開頭，且差異衰減（開頭之後不是同一個波形就會失敗）。
    head = np.abs(one - ref)[: dec.hop].max()
    assert head > 3 * TOL
    assert np.abs(one - ref)[-dec.hop :].max() < head
    # 短序列整段送進來：transformers 先補零再反射的規則也相同。
    for n in (1, 2, s - 1):
        assert (
            np.abs(_stream(dec, codes[:, :n], [n]) - full_decode(model, codes[:, :n])).max() <= TOL
        )


def test_causal_pad_mode_streams_exactly_from_the_first_frame() -> None:
    model = _random_model(pad_mode="constant")
    dec = VoilaStreamDecoder(model)
    codes = np.random.default_rng(2).integers(0, 64, (3, 15))
    assert np.abs(_stream(dec, codes, [1] * 15) - full_decode(model, codes)).max() <= TOL


def test_batched_rows_join_leave_and_reset(models) -> None:
    """三個串流在不同時間加入、一個中途重設（新的一輪）、一個中途離開：每列與單獨解碼相同。"""
    model, q = models["demo"]
    dec = VoilaStreamDecoder(model)
    rng = np.random.default_rng(4)
    codes = {k: rng.integers(0, 2048, (q, 14)) for k in "abc"}
    joins, leave, reset = {"a": 0, "b": 3, "c": 5}, {"b": 10}, {"a": 8}
    rows: list[str] = []
    state: VoilaStreamState | None = None
    got: dict[str, list[np.ndarray]] = {k: [] for k in "abc"}
    pos = dict.fromkeys("abc", 0)
    for t in range(14):
        for k in "abc":
            if joins[k] == t:
                rows.append(k)
                fresh = dec.new_state(1)
                state = fresh if state is None else VoilaStreamState.cat([state, fresh])
            if leave.get(k) == t:
                keep = [i for i, r in enumerate(rows) if r != k]
                rows, state = [rows[i] for i in keep], state.select(keep)
            if reset.get(k) == t:
                state.reset([rows.index(k)])
        batch = np.stack([codes[k][:, pos[k] : pos[k] + 1] for k in rows])
        wave = dec.decode(state, batch)
        for i, k in enumerate(rows):
            got[k].append(wave[i])
            pos[k] += 1
    # 參考：每個串流的每一段各自從新狀態逐幀解。
    segments = {"a": [(0, 8), (8, 14)], "b": [(0, 7)], "c": [(0, 9)]}
    for k, segs in segments.items():
        ref = np.concatenate([_stream(dec, codes[k][:, a:b], [1] * (b - a)) for a, b in segs])
        assert np.abs(np.concatenate(got[k]) - ref).max() <= TOL, k
    # 拆開再合併不改變狀態。
    again = VoilaStreamState.cat(state.split())
    assert all(torch.equal(again.tensors[n], state.tensors[n]) for n in state.tensors)


def test_weight_norm_cache_follows_weight_changes() -> None:
    """解碼器記下 weight norm 算好的卷積權重；原始參數改變（例如載入新權重）時重算，與新建的
    解碼器相同，而不是沿用舊權重。"""
    model = _random_model()
    dec = VoilaStreamDecoder(model)
    codes = np.random.default_rng(5).integers(0, 64, (1, 2, 4))
    before = dec.decode(dec.new_state(1), codes)
    with torch.no_grad():
        for conv in model.decoder.modules():
            if hasattr(conv, "parametrizations"):
                conv.parametrizations.weight.original0.mul_(1.5)
    after = dec.decode(dec.new_state(1), codes)
    fresh = VoilaStreamDecoder(model)
    assert np.abs(after - fresh.decode(fresh.new_state(1), codes)).max() <= TOL
    assert np.abs(after - before).max() > 1e-3


def test_rejects_bad_codes(models) -> None:
    model, q = models["demo"]
    dec = VoilaStreamDecoder(model)
    st = dec.new_state(2)
    with pytest.raises(ValueError, match="形狀"):
        dec.decode(st, np.zeros((1, q, 1), np.int64))
    with pytest.raises(ValueError, match="範圍"):
        dec.decode(st, np.full((2, q, 1), 2048))
    with pytest.raises(ValueError, match="因果"):
        VoilaStreamDecoder(_random_model(causal=False))


def test_server_cli_rejects_unknown_decode_mode(capsys) -> None:
    assert run_cli(server_main, ["--config", "serving", "--config.decode_mode=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("錯誤：") and "decode_mode" in err[0]
