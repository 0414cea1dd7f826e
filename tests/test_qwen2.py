"""Qwen2 NNX 模型與 `transformers.Qwen2ForCausalLM` 在相同權重上的一致性測試。"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from speakllm_jax.checkpoints.hf import load_qwen2
from speakllm_jax.checkpoints.qwen2_hf import qwen2_config_from_hf, qwen2_config_to_hf
from speakllm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, generate
from speakllm_jax.models.sharding import activation_spec
from speakllm_jax.training.sharding import make_mesh

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)


def make_hf_checkpoint(path, tie: bool, seed: int = 0, torch_dtype=torch.float32):
    """以固定亂數種子建立小型 HF Qwen2，把偏置與正規化權重也隨機化後存檔。"""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tie)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model = model.to(torch_dtype)
    model.save_pretrained(path)
    return model


def left_padded_batch(rng: np.random.RandomState, batch: int, length: int, pads: list[int]):
    ids = rng.randint(0, TINY["vocab_size"], (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    return pos


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        if mask is None:
            return model(torch.tensor(ids)).logits.float().numpy()
        return (
            model(
                torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(hf_positions(mask)),
            )
            .logits.float()
            .numpy()
        )


# 模組層級的 jit：相同結構的模型（相同 graphdef）共用編譯結果。
_forward = nnx.jit(lambda m, ids: m(ids))
_forward_masked = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
_forward_positions = nnx.jit(lambda m, ids, mask, pos: m(ids, attention_mask=mask, positions=pos))


def run(model, ids, mask=None) -> np.ndarray:
    if mask is None:
        return np.asarray(_forward(model, jnp.asarray(ids)))
    return np.asarray(_forward_masked(model, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_tied")
    return path, make_hf_checkpoint(path, tie=True), True


@pytest.fixture(scope="module")
def untied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_untied")
    return path, make_hf_checkpoint(path, tie=False, seed=1), False


@pytest.fixture(params=["tied", "untied"])
def ckpt(request):
    return request.getfixturevalue(request.param + "_ckpt")


def test_logits_match_transformers(ckpt):
    path, hf, tie = ckpt
    model = load_qwen2(path)
    assert model.cfg.tie_word_embeddings is tie
    assert (model.lm_head is None) is tie
    rng = np.random.RandomState(1)
    ids, _ = left_padded_batch(rng, 2, 11, [0, 0])
    ours = run(model, ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape == (2, 11, TINY["vocab_size"])
    assert np.abs(ours - ref).max() <= 1e-4

    ids, mask = left_padded_batch(rng, 3, 11, [0, 4, 7])
    ours = run(model, ids, mask)
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # 明確給出位置（與 HF 相同的累加位置）結果相同。
    explicit = np.asarray(
        _forward_positions(
            model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(hf_positions(mask))
        )
    )
    np.testing.assert_allclose(explicit, ours, atol=1e-6)
    # 左填充的列與未填充的同一序列給出相同 logits（位置由遮罩累加）。
    alone = run(model, ids[2:, 7:])
    np.testing.assert_allclose(ours[2, 7:], alone[0], atol=1e-4)


def test_generate_matches_transformers(untied_ckpt):
    path, hf, _ = untied_ckpt
    model = load_qwen2(path)
    ids, mask = left_padded_batch(np.random.RandomState(2), 2, 9, [0, 3])
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    ours = generate(model, ids, 32, attention_mask=mask)
    assert ours.shape == ref.shape == (2, 9 + 32)
    np.testing.assert_array_equal(ours, ref)


def test_generate_stops_at_eos_like_transformers(tied_ckpt):
    path, hf, _ = tied_ckpt
    model = load_qwen2(path)
    ids, mask = left_padded_batch(np.random.RandomState(3), 2, 6, [0, 2])

    def hf_generate(ids, mask, eos):
        with torch.no_grad():
            return hf.generate(
                torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=eos,
                pad_token_id=0 if eos is None else eos,
            ).numpy()

    free = generate(model, ids, 12, attention_mask=mask)
    np.testing.assert_array_equal(free, hf_generate(ids, mask, None))
    eos = int(free[0, 6 + 4])  # 第一列第 5 個新詞當作 eos
    ours = generate(model, ids, 12, attention_mask=mask, eos_id=eos)
    np.testing.assert_array_equal(ours, hf_generate(ids, mask, eos))
    # 兩列都結束時與 HF 一樣提早截斷。
    same, same_mask = ids[[0, 0]], mask[[0, 0]]
    ours = generate(model, same, 12, attention_mask=same_mask, eos_id=eos)
    ref = hf_generate(same, same_mask, eos)
    assert ours.shape[1] < 6 + 12 and ours[0, -1] == eos
    np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_recompute(untied_ckpt):
    path, _, _ = untied_ckpt
    model = load_qwen2(path)
    total, prompt = 12, 5
    ids, mask = left_padded_batch(np.random.RandomState(4), 2, total, [0, 3])
    # 因果模型：整段重算時第 t 個位置的 logits 只依賴前 t+1 個詞，即每一步的完整重算結果。
    full = run(model, ids, mask)

    @nnx.jit
    def step(m, tok, tok_mask, cache):
        h, cache = m.forward_embeds(m.embed(tok), tok_mask, cache=cache)
        return m.logits(h), cache

    cache = model.init_cache(2, total)
    logits, cache = step(model, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache)
    real = mask[:, :prompt].astype(bool)
    assert np.abs(np.asarray(logits) - full[:, :prompt])[real].max() <= 1e-5
    for t in range(prompt, total):
        logits, cache = step(
            model, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache
        )
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)
    assert int(cache.index) == total
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(-1))


def test_sharded_load_matches_single_device(tmp_path):
    make_hf_checkpoint(tmp_path, tie=False, seed=5)
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    single = load_qwen2(tmp_path)
    sharded = load_qwen2(tmp_path, mesh=mesh)
    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (TINY["num_hidden_layers"], 16, 32)
    emb = sharded.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(emb.sharding.device_set) == 8
    down = sharded.layers.mlp.down_proj.kernel[...]
    assert down.addressable_shards[0].data.shape == (TINY["num_hidden_layers"], 64, 16)

    ids, mask = left_padded_batch(np.random.RandomState(6), 4, 10, [0, 2, 0, 5])
    ref = run(single, ids, mask)
    batch_sharding = activation_spec(("batch", "length"), mesh)
    out = _forward_masked(
        sharded,
        jax.device_put(jnp.asarray(ids), batch_sharding),
        jax.device_put(jnp.asarray(mask), batch_sharding),
    )
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_bf16_checkpoint_loads_and_runs(tmp_path):
    hf = make_hf_checkpoint(tmp_path, tie=False, seed=7, torch_dtype=torch.bfloat16)
    assert transformers.Qwen2Config.from_pretrained(tmp_path).dtype == torch.bfloat16
    model = load_qwen2(tmp_path, dtype=jnp.bfloat16)
    assert model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = left_padded_batch(np.random.RandomState(8), 2, 10, [0, 3])
    out = run(model, ids, mask)
    assert out.dtype == np.float32
    # 同一份 bf16 權重以 fp32 計算的參考值（重新載入，RoPE 頻率才是 fp32）。
    del hf
    hf32 = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref32 = hf_logits(hf32, ids, mask)
    ours32 = run(load_qwen2(tmp_path), ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours32 - ref32)[real].max() <= 1e-4
    scale = np.abs(ref32[real]).max()
    err = np.abs(out - ref32)[real]
    assert err.max() <= 0.05 * scale and err.mean() <= 0.01 * scale


def test_remat_and_unrolled_layers_give_same_results():
    cfg = Qwen2Config(**{**TINY, "num_hidden_layers": 2}, tie_word_embeddings=True)
    base = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(9).randint(0, 256, (2, 6)))

    def variant(**kw):
        m = Qwen2ForCausalLM(cfg.replace(**kw), rngs=nnx.Rngs(1))
        nnx.update(m, nnx.state(base))
        return m

    unrolled = variant(scan_layers=False)
    np.testing.assert_allclose(run(unrolled, ids), run(base, ids), atol=1e-5)

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    @nnx.jit
    def both_grads(a, b):
        return nnx.grad(loss)(a), nnx.grad(loss)(b)

    g_base, g_remat = both_grads(base, variant(remat="full"))
    g_base = g_base.layers.self_attn.q_proj.kernel[...]
    g_remat = g_remat.layers.self_attn.q_proj.kernel[...]
    assert float(jnp.abs(g_base).max()) > 0
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_base), rtol=1e-4, atol=1e-7)


def _nnx_param_count(cfg: Qwen2Config) -> int:
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _torch_meta_param_count(cfg: Qwen2Config) -> int:
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**qwen2_config_to_hf(cfg)))
    return sum(p.numel() for p in model.parameters())


def test_full_size_param_counts():
    cfg7 = Qwen2Config.qwen2_5_7b()
    assert cfg7.head_dim == 128 and not cfg7.tie_word_embeddings
    assert _nnx_param_count(cfg7) == 7_615_616_512
    assert _torch_meta_param_count(cfg7) == 7_615_616_512
    cfg05 = Qwen2Config.qwen2_5_0_5b()
    assert cfg05.tie_word_embeddings
    assert _nnx_param_count(cfg05) == 494_032_768
    assert _torch_meta_param_count(cfg05) == 494_032_768


def test_config_roundtrip_through_transformers():
    cfg = Qwen2Config.qwen2_5_7b(dtype="bfloat16")
    d = qwen2_config_to_hf(cfg)
    assert d["model_type"] == "qwen2" and d["architectures"] == ["Qwen2ForCausalLM"]
    hf = transformers.Qwen2Config(**d)
    assert hf.num_key_value_heads == 4 and hf.rope_parameters["rope_theta"] == 1e6
    back = qwen2_config_from_hf(hf.to_dict(), dtype="bfloat16")
    assert back.replace(hf_extra=()) == cfg
    # Qwen2.5-7B-Instruct 官方 config.json 的內容（舊版欄位 rope_theta / torch_dtype）。
    official = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    }
    parsed = qwen2_config_from_hf(official)
    assert parsed.replace(hf_extra=()) == Qwen2Config.qwen2_5_7b()
    assert qwen2_config_to_hf(parsed)["eos_token_id"] == 151645
    with pytest.raises(ValueError, match="model_type"):
        qwen2_config_from_hf({**d, "model_type": "llama"})
    with pytest.raises(ValueError, match="hidden_size"):
        qwen2_config_from_hf({k: v for k, v in d.items() if k != "hidden_size"})
