"""HF safetensors 讀寫（`hf_io`）與 Qwen2 存檔往返 `transformers` 的測試。"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from speakllm_jax.checkpoints.hf import load_qwen2, save_qwen2
from speakllm_jax.checkpoints.hf_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsFolder,
    read_config,
    write_safetensors,
)
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from speakllm_jax.models.sharding import DEFAULT_RULES, rules_from_config, use_rules
from speakllm_jax.training.sharding import make_mesh

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=256,
)

_forward = nnx.jit(lambda m, ids: m(ids))


def random_model(tie: bool, seed: int = 0) -> Qwen2ForCausalLM:
    """隨機初始化後再對每個參數加上雜訊（偏置與正規化權重也不再是 0／1）。"""
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tie), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, leaves))
    nnx.update(model, state)
    return model


def flat_params(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def expected_hf_tensors(model: Qwen2ForCausalLM) -> dict[str, np.ndarray]:
    """由 NNX 參數直接寫出 HF 命名與佈局（獨立於 hf_io 的鍵對應，用來交叉檢查）。"""
    p = flat_params(model)
    out = {
        "model.embed_tokens.weight": p["embed_tokens.embedding"],
        "model.norm.weight": p["norm.weight"],
    }
    if "lm_head.kernel" in p:
        out["lm_head.weight"] = p["lm_head.kernel"].T
    for i in range(model.cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = p["layers.input_layernorm.weight"][i]
        out[pre + "post_attention_layernorm.weight"] = p["layers.post_attention_layernorm.weight"][
            i
        ]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[pre + f"self_attn.{name}.weight"] = p[f"layers.self_attn.{name}.kernel"][i].T
        for name in ("q_proj", "k_proj", "v_proj"):
            out[pre + f"self_attn.{name}.bias"] = p[f"layers.self_attn.{name}.bias"][i]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[pre + f"mlp.{name}.weight"] = p[f"layers.mlp.{name}.kernel"][i].T
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_then_transformers_from_pretrained(tmp_path, tie):
    model = random_model(tie, seed=1)
    save_qwen2(model, tmp_path)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    cfg = read_config(tmp_path)
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]

    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    expected = expected_hf_tensors(model)
    if tie:
        assert "lm_head.weight" not in SafetensorsFolder(tmp_path)
        np.testing.assert_array_equal(
            sd.pop("lm_head.weight"), expected["model.embed_tokens.weight"]
        )
    assert sorted(sd) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(sd[key], value, err_msg=key)

    ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - ref).max() <= 1e-4

    back = load_qwen2(tmp_path)
    a, b = flat_params(model), flat_params(back)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sharded_save_writes_index_and_loads_everywhere(tmp_path):
    model = random_model(tie=False, seed=2)
    # 同一資料夾先有單檔存檔與一個無關的 safetensors：分片存檔取代前者、保留後者。
    save_qwen2(model, tmp_path)
    write_safetensors(tmp_path / "model_speech_head.safetensors", {"w": np.ones(3, np.float32)})
    save_qwen2(model, tmp_path, max_shard_bytes=60_000)
    assert (tmp_path / "model_speech_head.safetensors").is_file()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / SINGLE_FILE).exists()
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == shards
    expected = expected_hf_tensors(model)
    assert sorted(index["weight_map"]) == sorted(expected)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in expected.values())

    back = load_qwen2(tmp_path)
    a, b = flat_params(model), flat_params(back)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    on_mesh = load_qwen2(tmp_path, mesh=mesh)
    up = on_mesh.layers.mlp.up_proj.kernel[...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(up), a["layers.mlp.up_proj.kernel"])

    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sd = hf.state_dict()
    for key, value in expected.items():
        np.testing.assert_array_equal(sd[key].numpy(), value, err_msg=key)


def test_mesh_load_follows_the_configured_axis_rules(tmp_path):
    """直接分片到網格的載入用設定的 `logical_axis_rules`（明確給、或訓練中的目前規則表），
    沒給時才用預設表；換規則只改分片，不改數值。"""
    model = random_model(tie=False, seed=3)
    save_qwen2(model, tmp_path)
    want = flat_params(model)["layers.mlp.up_proj.kernel"]
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    # 設定檔的格式（JSON 讀回是串列）：embed 不分片、mlp 改分到 fsdp。
    custom = [
        [name, None if name == "embed" else "fsdp" if name == "mlp" else target]
        for name, target in DEFAULT_RULES
    ]

    def spec(**kw):
        up = load_qwen2(tmp_path, mesh=mesh, **kw).layers.mlp.up_proj.kernel[...]
        np.testing.assert_array_equal(np.asarray(up), want)
        return up.sharding.spec

    P = jax.sharding.PartitionSpec
    assert spec() == P(None, "fsdp", "tensor")
    assert spec(rules=custom) == P(None, None, "fsdp")
    with use_rules(rules_from_config(custom)):
        assert spec() == P(None, None, "fsdp")
        assert spec(rules=DEFAULT_RULES) == P(None, "fsdp", "tensor")


def test_save_bf16_is_read_by_transformers_as_bf16(tmp_path):
    model = random_model(tie=True, seed=3)
    save_qwen2(model, tmp_path, dtype=jnp.bfloat16)
    folder = SafetensorsFolder(tmp_path)
    assert folder.dtype("model.layers.0.mlp.up_proj.weight") == np.dtype(ml_dtypes.bfloat16)
    assert read_config(tmp_path)["dtype"] == "bfloat16"
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    want = expected_hf_tensors(model)["model.layers.1.self_attn.q_proj.weight"]
    got = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))
    # 以 bf16 參數載回本專案的模型，數值與寫出的 bf16 相同。
    back = load_qwen2(tmp_path, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(back.layers.self_attn.q_proj.kernel[...][1]).astype(np.float32), got.T
    )


def test_reader_matches_torch_for_fp16_bf16(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.fp16": torch.randn(4, generator=g).to(torch.float16),
        "c.fp32": torch.randn(2, 3, 2, generator=g),
        "d.i64": torch.arange(6).reshape(2, 3),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    folder = SafetensorsFolder(tmp_path)
    assert sorted(folder.keys()) == sorted(tensors)
    for key, t in tensors.items():
        got = folder.get(key)
        assert got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got.astype(np.float64), t.double().numpy(), err_msg=key)
    # 我們寫出的檔案也能被 safetensors 官方實作讀回。
    from safetensors.torch import load_file

    write_safetensors(tmp_path / "ours.safetensors", {k: folder.get(k) for k in tensors})
    again = load_file(str(tmp_path / "ours.safetensors"))
    for key, t in tensors.items():
        assert again[key].dtype == t.dtype
        assert torch.equal(again[key], t), key


def _rewrite(src, dst, edit) -> None:
    """讀入檢查點、以 `edit(dict)` 修改後寫到另一個資料夾（連同 config.json）。"""
    folder = SafetensorsFolder(src)
    tensors = {k: np.array(folder.get(k)) for k in folder.keys()}
    edit(tensors)
    dst.mkdir()
    write_safetensors(dst / SINGLE_FILE, tensors)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    good = tmp_path / "good"
    save_qwen2(random_model(tie=False, seed=4), good)
    assert load_qwen2(good) is not None

    missing_key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(good, tmp_path / "missing", lambda t: t.pop(missing_key))
    with pytest.raises(ValueError) as err:
        load_qwen2(tmp_path / "missing")
    msg = str(err.value)
    assert missing_key in msg and "(96, 64)" in msg

    extra_key = "model.layers.0.self_attn.extra_proj.weight"
    _rewrite(
        good, tmp_path / "extra", lambda t: t.update({extra_key: np.zeros((3, 5), np.float32)})
    )
    with pytest.raises(ValueError) as err:
        load_qwen2(tmp_path / "extra")
    msg = str(err.value)
    assert extra_key in msg and "(3, 5)" in msg

    bad_key = "model.layers.0.self_attn.k_proj.bias"
    _rewrite(good, tmp_path / "shape", lambda t: t.update({bad_key: np.zeros((31,), np.float32)}))
    with pytest.raises(ValueError) as err:
        load_qwen2(tmp_path / "shape")
    msg = str(err.value)
    assert bad_key in msg and "(32,)" in msg and "(31,)" in msg

    # 舊版存檔中的 RoPE 頻率緩衝區會被忽略。
    inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(good, tmp_path / "inv", lambda t: t.update({inv: np.ones((8,), np.float32)}))
    assert load_qwen2(tmp_path / "inv").cfg.num_hidden_layers == 2

    # 綁定詞嵌入的檢查點若多存了 lm_head.weight（等於詞嵌入）也能載入。
    tied = tmp_path / "tied"
    save_qwen2(random_model(tie=True, seed=5), tied)
    with_head = tmp_path / "tied_head"
    _rewrite(
        tied, with_head, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]})
    )
    assert load_qwen2(with_head).lm_head is None

    bad_cfg = tmp_path / "cfg"
    _rewrite(good, bad_cfg, lambda t: None)
    cfg = read_config(bad_cfg)
    cfg["hidden_act"] = "gelu"
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act"):
        load_qwen2(bad_cfg)
