"""Whisper 的 Hugging Face 檢查點讀寫（官方 safetensors 佈局 ↔ `speakllm_jax.models.whisper`）。

支援的資料夾佈局（依 safetensors 中的鍵自動判斷前綴）：

- `WhisperForConditionalGeneration`：`model.encoder.*`、`model.decoder.*`；`proj_out.weight`
  與 `model.decoder.embed_tokens.weight` 綁定，通常不會寫入檔案，若存在則必須與詞嵌入相同。
- `WhisperModel`：`encoder.*`、`decoder.*`（沒有 `model.` 前綴）。
- 僅編碼器（`transformers` 的 `WhisperEncoder.save_pretrained`）：`conv1.*`、`layers.*` 等，
  沒有任何前綴；只能以 `encoder_only=True` 載入。

`config.json` 與 `WhisperConfig` 的轉換（`whisper_config_from_hf`／`whisper_config_to_hf`）也在
這裡，模型模組不認得 HF 的格式。

形狀轉換：線性層 HF `[out, in]` ↔ NNX `[in, out]`；卷積 HF `[out, in, k]` ↔ NNX `[k, in, out]`；
各層以 `nnx.vmap` 堆疊於第 0 軸。編碼器的 `embed_positions.weight` 一律從檢查點載入
（不重新計算）。

`save_whisper`：
- 完整模型 → `WhisperForConditionalGeneration` 佈局（`model.` 前綴、不寫 `proj_out.weight`），
  `WhisperForConditionalGeneration.from_pretrained` 與 `WhisperModel.from_pretrained` 都能讀。
- 僅編碼器 → 無前綴的 `WhisperEncoder` 佈局（config.json 的 `architectures` 為
  `["WhisperEncoder"]`），以 `transformers.models.whisper.modeling_whisper.WhisperEncoder
  .from_pretrained` 讀取。沒有解碼器權重就無法組成 `WhisperModel` 資料夾，因此不假造解碼器。
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speakllm_jax.checkpoints.hf_io import (
    KeyMap,
    ParamMap,
    SafetensorsFolder,
    load_params,
    read_config,
    save_params,
    stacked_keys,
    transposed,
)
from speakllm_jax.models.whisper import MEDIUM_TOKENS, Whisper, WhisperConfig, WhisperEncoder

# transformers `WhisperConfig` 的預設值；config.json 缺少某欄時以此補上。
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "encoder_ffn_dim": 1536,
    "d_model": 384,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# 由本設定類別產生的 HF 欄位；其他欄位原樣保存在 `hf_extra`。
_OWNED_HF_KEYS = set(_HF_DEFAULTS) | {
    "model_type",
    "architectures",
    "activation_function",
    "scale_embedding",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "dtype",
    "torch_dtype",
    "transformers_version",
}


def whisper_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
    """由 transformers 的 config.json 內容建立；`overrides` 可覆寫 dtype、remat 等欄位。"""
    if d.get("model_type", "whisper") != "whisper":
        raise ValueError(f"config.json 的 model_type 為 {d.get('model_type')!r}，不是 'whisper'")
    act = d.get("activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"config.json 的 activation_function={act!r}；只支援 'gelu'")
    if d.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json 的 tie_word_embeddings=false；只支援與詞嵌入綁定的輸出投影")
    kwargs: dict[str, Any] = {}
    for key, default in _HF_DEFAULTS.items():
        value = d.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"config.json 的欄位 {key} 必須是整數，收到 {value!r}")
        kwargs[key] = value
    dt = d.get("dtype") or d.get("torch_dtype")
    if isinstance(dt, str) and dt in _DTYPE_NAMES:
        kwargs["param_dtype"] = _DTYPE_NAMES[dt]
    extra = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in _OWNED_HF_KEYS))
    kwargs["hf_extra"] = extra
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def whisper_config_to_hf(
    cfg: WhisperConfig, architecture: str = "WhisperForConditionalGeneration"
) -> dict[str, Any]:
    """transformers `WhisperConfig` 能讀的 config.json 內容。"""
    out: dict[str, Any] = {k: json.loads(v) for k, v in cfg.hf_extra}
    # 詞表小到放不下官方特殊符號 id 的設定（隨機的小模型）若沒給 id，明寫詞表最後一個 id：
    # 否則 transformers 套用預設 id（50256、50257），載入時每個 id 各警告一次
    # （decoder_start_token_id 必須是整數，不能寫 null）。
    if cfg.vocab_size <= max(MEDIUM_TOKENS.values()):
        for key in MEDIUM_TOKENS:
            out.setdefault(key, cfg.vocab_size - 1)
    out.update({k: getattr(cfg, k) for k in _HF_DEFAULTS})
    dtype_name = jnp.dtype(cfg.param_dtype).name
    if dtype_name not in _DTYPE_NAMES:
        raise ValueError(f"param_dtype={dtype_name} 無法寫成 config.json 的 dtype")
    out.update(
        {
            "model_type": "whisper",
            "architectures": [architecture],
            "activation_function": "gelu",
            "scale_embedding": False,
            "tie_word_embeddings": True,
            "is_encoder_decoder": True,
            "dtype": dtype_name,
        }
    )
    return out


CONV_PERM = (2, 1, 0)  # HF [out, in, k] → NNX [k, in, out]

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _attn_map(nnx_prefix: str, hf_tpl: str, name: str, n: int) -> dict[str, ParamMap]:
    out: dict[str, ParamMap] = {}
    for proj in _ATTN:
        base_nnx = f"{nnx_prefix}layers.{name}.{proj}"
        out[f"{base_nnx}.kernel"] = transposed(stacked_keys(f"{hf_tpl}{name}.{proj}.weight", n))
        if proj != "k_proj":
            out[f"{base_nnx}.bias"] = ParamMap(stacked_keys(f"{hf_tpl}{name}.{proj}.bias", n))
    return out


def _ln_map(nnx_name: str, hf_name: str, stacked: int | None) -> dict[str, ParamMap]:
    out = {}
    for part in ("weight", "bias"):
        key = f"{hf_name}.{part}"
        out[f"{nnx_name}.{part}"] = (
            ParamMap(stacked_keys(key, stacked)) if stacked is not None else ParamMap(key)
        )
    return out


def _mlp_map(nnx_prefix: str, hf_tpl: str, n: int) -> dict[str, ParamMap]:
    out: dict[str, ParamMap] = {}
    for fc in ("fc1", "fc2"):
        out[f"{nnx_prefix}layers.{fc}.kernel"] = transposed(stacked_keys(f"{hf_tpl}{fc}.weight", n))
        out[f"{nnx_prefix}layers.{fc}.bias"] = ParamMap(stacked_keys(f"{hf_tpl}{fc}.bias", n))
    return out


def encoder_key_map(
    cfg: WhisperConfig, nnx_prefix: str = "", hf_prefix: str = "model.encoder."
) -> dict[str, ParamMap]:
    """編碼器的 NNX 路徑 → HF 鍵對應。"""
    n = cfg.encoder_layers
    tpl = hf_prefix + "layers.{i}."
    p = nnx_prefix
    m: dict[str, ParamMap] = {
        f"{p}conv1.kernel": ParamMap(f"{hf_prefix}conv1.weight", CONV_PERM),
        f"{p}conv1.bias": ParamMap(f"{hf_prefix}conv1.bias"),
        f"{p}conv2.kernel": ParamMap(f"{hf_prefix}conv2.weight", CONV_PERM),
        f"{p}conv2.bias": ParamMap(f"{hf_prefix}conv2.bias"),
        f"{p}embed_positions": ParamMap(f"{hf_prefix}embed_positions.weight"),
    }
    m.update(_attn_map(p, tpl, "self_attn", n))
    m.update(_ln_map(f"{p}layers.self_attn_layer_norm", tpl + "self_attn_layer_norm", n))
    m.update(_mlp_map(p, tpl, n))
    m.update(_ln_map(f"{p}layers.final_layer_norm", tpl + "final_layer_norm", n))
    m.update(_ln_map(f"{p}layer_norm", f"{hf_prefix}layer_norm", None))
    return m


def decoder_key_map(
    cfg: WhisperConfig, nnx_prefix: str = "decoder.", hf_prefix: str = "model.decoder."
) -> dict[str, ParamMap]:
    """解碼器的 NNX 路徑 → HF 鍵對應（輸出投影綁定詞嵌入，沒有自己的鍵）。"""
    n = cfg.decoder_layers
    tpl = hf_prefix + "layers.{i}."
    p = nnx_prefix
    m: dict[str, ParamMap] = {
        f"{p}embed_tokens.embedding": ParamMap(f"{hf_prefix}embed_tokens.weight"),
        f"{p}embed_positions": ParamMap(f"{hf_prefix}embed_positions.weight"),
    }
    m.update(_attn_map(p, tpl, "self_attn", n))
    m.update(_ln_map(f"{p}layers.self_attn_layer_norm", tpl + "self_attn_layer_norm", n))
    m.update(_attn_map(p, tpl, "encoder_attn", n))
    m.update(_ln_map(f"{p}layers.encoder_attn_layer_norm", tpl + "encoder_attn_layer_norm", n))
    m.update(_mlp_map(p, tpl, n))
    m.update(_ln_map(f"{p}layers.final_layer_norm", tpl + "final_layer_norm", n))
    m.update(_ln_map(f"{p}layer_norm", f"{hf_prefix}layer_norm", None))
    return m


def whisper_key_map(
    cfg: WhisperConfig, *, encoder_only: bool = False, hf_root: str = "model."
) -> KeyMap:
    """完整模型（`Whisper`）或僅編碼器（`WhisperEncoder`）的鍵對應。

    `hf_root` 為 HF 鍵的前綴：`"model."`（ForConditionalGeneration）或 `""`（WhisperModel）；
    僅編碼器模型另可用 `hf_root=None` 表示無前綴的 `WhisperEncoder` 佈局。
    """
    if encoder_only:
        enc_prefix = "" if hf_root is None else f"{hf_root}encoder."
        return encoder_key_map(cfg, "", enc_prefix)
    if hf_root is None:
        raise ValueError(
            "完整 Whisper 模型需要 encoder/decoder 前綴；hf_root=None 只適用於僅編碼器"
        )
    m = encoder_key_map(cfg, "encoder.", f"{hf_root}encoder.")
    m.update(decoder_key_map(cfg, "decoder.", f"{hf_root}decoder."))
    return m


def detect_hf_root(folder: SafetensorsFolder) -> str | None:
    """依鍵判斷佈局：`"model."`、`""`（WhisperModel），或 `None`（無前綴的僅編碼器）。"""
    keys = set(folder.keys())
    if "model.encoder.conv1.weight" in keys:
        return "model."
    if "encoder.conv1.weight" in keys:
        return ""
    if "conv1.weight" in keys:
        return None
    raise ValueError(
        f"檢查點 {folder.path} 不像 Whisper：找不到 model.encoder.conv1.weight、"
        f"encoder.conv1.weight 或 conv1.weight"
    )


def _check_tied(folder: SafetensorsFolder, hf_root: str) -> list[str]:
    """若檔案中有 `proj_out.weight`，確認它與詞嵌入相同（本實作只支援綁定）。"""
    if "proj_out.weight" not in folder:
        return []
    emb_key = f"{hf_root}decoder.embed_tokens.weight"
    if emb_key in folder:
        a, b = folder.get("proj_out.weight"), folder.get(emb_key)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(
                f"檢查點 {folder.path} 的 proj_out.weight {a.shape} 與 {emb_key} {b.shape} 不同；"
                "只支援綁定的輸出投影"
            )
    return [r"proj_out\.weight"]


def load_whisper(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    encoder_only: bool = False,
    **config_overrides: Any,
) -> Whisper | WhisperEncoder:
    """讀取 HF Whisper 資料夾（config.json + safetensors），回傳 `Whisper` 或 `WhisperEncoder`。

    `dtype` 同時是參數型別與計算型別（可用 `config_overrides` 另給 `dtype`／`param_dtype`、
    `remat`、`scan_layers`）。`encoder_only=True` 時只載入編碼器，檢查點中的解碼器鍵被明確忽略。
    給 `mesh` 時每個參數依邏輯軸規則 `rules` 直接分片放置；未給 `rules` 時用目前的規則表
    （訓練中為設定的 `logical_axis_rules`，否則 `DEFAULT_RULES`）。
    鍵缺少、多出或形狀不符時以 `ValueError` 指名鍵。
    """
    folder_path = Path(path)
    hf_cfg = read_config(folder_path)
    overrides = {"dtype": dtype, "param_dtype": dtype}
    overrides.update(config_overrides)
    cfg = whisper_config_from_hf(hf_cfg, **overrides)
    folder = SafetensorsFolder(folder_path)
    root = detect_hf_root(folder)
    if root is None and not encoder_only:
        raise ValueError(
            f"檢查點 {folder.path} 只有編碼器權重（無前綴的 WhisperEncoder 佈局）；請用 encoder_only=True"
        )
    ignore: list[str] = []
    if root is not None:
        ignore += _check_tied(folder, root)
    if encoder_only:
        if root is not None:
            ignore += [re.escape(f"{root}decoder.") + ".*"]
        abstract = nnx.eval_shape(lambda: WhisperEncoder(cfg, rngs=nnx.Rngs(0)))
    else:
        abstract = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    key_map = whisper_key_map(cfg, encoder_only=encoder_only, hf_root=root)
    return load_params(
        abstract,
        key_map,
        folder,
        dtype=cfg.param_dtype,
        mesh=mesh,
        rules=rules,
        ignore=ignore,
    )


def save_whisper(
    model: Whisper | WhisperEncoder,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """把模型存成 transformers 能讀的資料夾（佈局見模組說明）。"""
    cfg: WhisperConfig = model.config
    kw: dict[str, Any] = {"dtype": dtype}
    if max_shard_bytes is not None:
        kw["max_shard_bytes"] = max_shard_bytes
    if isinstance(model, Whisper):
        key_map = whisper_key_map(cfg, hf_root="model.")
        hf_cfg = whisper_config_to_hf(cfg, "WhisperForConditionalGeneration")
    elif isinstance(model, WhisperEncoder):
        key_map = whisper_key_map(cfg, encoder_only=True, hf_root=None)
        hf_cfg = whisper_config_to_hf(cfg, "WhisperEncoder")
    else:
        raise ValueError(
            f"save_whisper 需要 Whisper 或 WhisperEncoder，收到 {type(model).__name__}"
        )
    if dtype is not None:
        hf_cfg["dtype"] = jnp.dtype(dtype).name
    return save_params(model, key_map, path, config=hf_cfg, **kw)
