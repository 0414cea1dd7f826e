"""CosyVoice2 `llm.pt` 佈局的 safetensors ↔ `CosyVoice2Talker` 的讀寫。

官方 `llm.pt` 是 `Qwen2LM.state_dict()` 的 `torch.save`：
`llm.model.model.embed_tokens.weight`、`llm.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.*`、
`llm.model.model.layers.{i}.mlp.{gate,up,down}_proj.weight`、
`llm.model.model.layers.{i}.{input,post_attention}_layernorm.weight`、`llm.model.model.norm.weight`、
`llm.model.lm_head.weight`（Qwen2.5-0.5B 綁定詞嵌入，state_dict 仍列出它；綁定時忽略）、
`llm_embedding.weight [2, d]`、`speech_embedding.weight [6564, d]`、
`llm_decoder.weight [6564, d]`／`llm_decoder.bias [6564]`。
本專案的融合模組鍵為 `fusion.{proj_in,proj_out,gate}.{weight,bias}`；官方檔沒有這些鍵，
此時融合參數保留初始化值（偏置為 0，思考者隱狀態為 0 時退化成原本的 CosyVoice2）。

JAX 路徑不匯入 torch：官方 `llm.pt`（pickle）先以 `python -m export.convert_llm_pt` 轉成同鍵的
safetensors（一次），這裡以 `hf_io` 的記憶體映射讀取；給 `.pt` 時報一行錯誤並指出轉換指令。
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    path_str,
    transposed,
    write_safetensors,
)
from speakllm_jax.checkpoints.qwen2_hf import qwen2_key_map
from speakllm_jax.cli import UserValueError
from speakllm_jax.models.cosyvoice2_talker import (
    CosyVoice2Talker,
    TalkerConfig,
    TalkerFusion,
)
from speakllm_jax.models.sharding import rules_from_config, shard_model

# 官方主幹鍵的前綴：Qwen2LM.llm（Qwen2Encoder）.model（Qwen2ForCausalLM）。
BACKBONE_PREFIX = "llm.model."
# 允許存在但不載入的鍵：舊版 transformers 的 RoPE 緩衝區。
_IGNORE_ALWAYS = (
    r"llm\.model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"llm\.model\.model\.rotary_emb\..*",
)
_FUSION_LINEARS = ("proj_in", "proj_out", "gate")


def _prefixed(pm: ParamMap, prefix: str) -> ParamMap:
    hf = prefix + pm.hf if isinstance(pm.hf, str) else tuple(prefix + k for k in pm.hf)
    return ParamMap(hf, pm.perm)


def fusion_key_map() -> dict[str, ParamMap]:
    """融合模組的 NNX 路徑 → 鍵（`fusion.*`，線性層權重轉置）。"""
    km: dict[str, ParamMap] = {}
    for name in _FUSION_LINEARS:
        km[f"fusion.{name}.kernel"] = transposed(f"fusion.{name}.weight")
        km[f"fusion.{name}.bias"] = ParamMap(f"fusion.{name}.bias")
    return km


def talker_key_map(cfg: TalkerConfig, include_fusion: bool = True) -> dict[str, ParamMap]:
    """`CosyVoice2Talker` 的 NNX 路徑 → `llm.pt` 鍵。"""
    km: dict[str, ParamMap] = {}
    for name, pm in qwen2_key_map(cfg.qwen).items():
        pm = pm if isinstance(pm, ParamMap) else ParamMap(pm)
        km["llm." + name] = _prefixed(pm, BACKBONE_PREFIX)
    km["speech_embedding.embedding"] = ParamMap("speech_embedding.weight")
    km["llm_embedding.embedding"] = ParamMap("llm_embedding.weight")
    km["llm_decoder.kernel"] = transposed("llm_decoder.weight")
    km["llm_decoder.bias"] = ParamMap("llm_decoder.bias")
    if include_fusion and cfg.thinker_hidden > 0:
        km.update(fusion_key_map())
    return km


# ---------------------------------------------------------------- 讀取來源

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def convert_hint(path: str | os.PathLike) -> str:
    """把 PyTorch pickle 轉成 safetensors 的指令（錯誤訊息用）。"""
    p = Path(path)
    return f"python -m export.convert_llm_pt --input {p} --output {p.with_suffix('.safetensors')}"


def _open(path: str | os.PathLike) -> SafetensorsFolder:
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        raise UserValueError(
            f"{p}：JAX 端不讀 PyTorch pickle（{p.suffix}），請先轉成 safetensors：{convert_hint(p)}"
        )
    return SafetensorsFolder(p)


# ---------------------------------------------------------------- 載入


def abstract_talker(cfg: TalkerConfig) -> CosyVoice2Talker:
    """只有形狀、不配置記憶體的 talker。"""
    return nnx.eval_shape(lambda: CosyVoice2Talker(cfg, rngs=nnx.Rngs(0)))


def load_cosyvoice2_llm(
    path: str | os.PathLike,
    cfg: TalkerConfig | None = None,
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    seed: int = 0,
) -> CosyVoice2Talker:
    """載入 `llm.pt` 佈局的 safetensors（`export.convert_llm_pt` 的輸出）到 `CosyVoice2Talker`。

    `cfg` 缺省為官方結構（`TalkerConfig.cosyvoice2()`）。缺少的鍵、多出的鍵（RoPE 緩衝區與
    綁定時的 `llm.model.lm_head.weight` 除外）與形狀不符一律 `ValueError`，訊息指名鍵與形狀。
    設定有融合模組而檔案中沒有任何 `fusion.*` 鍵時，融合參數以 `seed` 初始化（偏置 0）；
    只有部分 `fusion.*` 鍵時報錯。`dtype` 為參數型別（缺省用 `cfg.qwen.param_dtype`）。
    給 `mesh` 時依 `rules`（未給時為目前的規則表）直接分片放置。
    """
    cfg = TalkerConfig.cosyvoice2() if cfg is None else cfg
    source = _open(path)
    ignore = list(_IGNORE_ALWAYS)
    if cfg.qwen.tie_word_embeddings:
        ignore.append(r"llm\.model\.lm_head\.weight")
    has_fusion_keys = any(k.startswith("fusion.") for k in source.keys())
    fresh_fusion = cfg.thinker_hidden > 0 and not has_fusion_keys
    load_cfg = cfg.replace(thinker_hidden=0) if fresh_fusion else cfg
    model = load_params(
        abstract_talker(load_cfg),
        talker_key_map(load_cfg),
        source,
        dtype=cfg.qwen.param_dtype if dtype is None else dtype,
        mesh=mesh,
        rules=rules,
        ignore=ignore,
    )
    if fresh_fusion:
        # 官方檔沒有融合參數：只建立融合模組（偏置 0），不重建整個主幹。
        q = cfg.qwen
        model.fusion = nnx.data(
            TalkerFusion(
                cfg.thinker_hidden,
                q.hidden_size,
                cfg.fusion_width,
                cfg.fusion,
                dtype=q.dtype,
                param_dtype=q.param_dtype if dtype is None else dtype,
                rngs=nnx.Rngs(seed),
            )
        )
        model.cfg = cfg
        if mesh is not None:
            shard_model(model.fusion, mesh, None if rules is None else rules_from_config(rules))
    return model


# ---------------------------------------------------------------- 存檔


def talker_tensors(
    model: CosyVoice2Talker, include_fusion: bool = True, dtype: Any = None
) -> dict[str, np.ndarray]:
    """依 `llm.pt` 佈局取出 `{鍵: np.ndarray}`；綁定詞嵌入時也寫出 `llm.model.lm_head.weight`。"""
    cfg: TalkerConfig = model.cfg
    km: KeyMap = talker_key_map(cfg, include_fusion=include_fusion)
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    out: dict[str, np.ndarray] = {}
    for name, pm in km.items():
        pm = pm if isinstance(pm, ParamMap) else ParamMap(pm)
        arr = np.asarray(jax.device_get(flat[name]))
        if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(dtype)
        if pm.stacked:
            for i, key in enumerate(pm.keys):
                out[key] = np.ascontiguousarray(pm.to_hf(arr[i]))
        else:
            out[pm.keys[0]] = np.ascontiguousarray(pm.to_hf(arr))
    if cfg.qwen.tie_word_embeddings:
        out[BACKBONE_PREFIX + "lm_head.weight"] = out[BACKBONE_PREFIX + "model.embed_tokens.weight"]
    return out


def save_cosyvoice2_llm(
    model: CosyVoice2Talker,
    path: str | os.PathLike,
    include_fusion: bool = True,
    dtype: Any = None,
) -> Path:
    """把 talker 存成 `llm.pt` 佈局的 safetensors（要 `.pt` 時再以 `export.convert_llm_pt --reverse`）。

    `include_fusion=False` 時不寫融合參數（與官方檔相同的鍵集合）。
    """
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        raise UserValueError(
            f"{p}：JAX 端只寫 safetensors；要 {p.suffix} 時以 "
            "python -m export.convert_llm_pt --reverse 轉換"
        )
    # 每個鍵各自寫出（綁定時 lm_head 與詞嵌入是兩份）。
    return write_safetensors(p, talker_tensors(model, include_fusion=include_fusion, dtype=dtype))
