"""CosyVoice2 `llm.pt`（或同鍵的 safetensors）↔ `CosyVoice2Talker` 的讀寫。

官方 `llm.pt` 是 `Qwen2LM.state_dict()` 的 `torch.save`：
`llm.model.model.embed_tokens.weight`、`llm.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.*`、
`llm.model.model.layers.{i}.mlp.{gate,up,down}_proj.weight`、
`llm.model.model.layers.{i}.{input,post_attention}_layernorm.weight`、`llm.model.model.norm.weight`、
`llm.model.lm_head.weight`（Qwen2.5-0.5B 綁定詞嵌入，state_dict 仍列出它；綁定時忽略）、
`llm_embedding.weight [2, d]`、`speech_embedding.weight [6564, d]`、
`llm_decoder.weight [6564, d]`／`llm_decoder.bias [6564]`。
本專案的融合模組鍵為 `fusion.{proj_in,proj_out,gate}.{weight,bias}`；官方檔沒有這些鍵，
此時融合參數保留初始化值（偏置為 0，思考者隱狀態為 0 時退化成原本的 CosyVoice2）。

只有讀寫 `.pt` 檔時才匯入 torch；safetensors 檔以 `hf_io` 的記憶體映射讀取。
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
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
from speakllm_jax.models.cosyvoice2_talker import (
    CosyVoice2Talker,
    TalkerConfig,
    TalkerFusion,
)
from speakllm_jax.models.sharding import DEFAULT_RULES, shard_model

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


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


class _DictSource(SafetensorsFolder):
    """把 `{鍵: np.ndarray}` 包成 `load_params` 可用的來源（與 `SafetensorsFolder` 同介面）。"""

    def __init__(self, path: Path, tensors: Mapping[str, np.ndarray]) -> None:
        self.path = path
        self.metadata = {}
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self.get(key).dtype

    def get(self, key: str) -> np.ndarray:
        if key not in self._tensors:
            raise KeyError(f"檢查點 {self.path} 中沒有鍵 {key}")
        return self._tensors[key]


def read_llm_pt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """讀取 `llm.pt`（`torch.load(weights_only=True)`）→ `{鍵: np.ndarray}`。"""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"找不到 CosyVoice2 LM 檢查點 {p}")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p} 的內容是 {type(obj).__name__}，預期 state_dict（鍵 → 張量）")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{p} 的鍵 {k} 不是張量（{type(v).__name__}）")
        out[str(k)] = _torch_to_numpy(v)
    return out


def _open(path: str | os.PathLike) -> SafetensorsFolder:
    p = Path(path)
    if p.suffix in (".pt", ".pth", ".bin"):
        return _DictSource(p, read_llm_pt(p))
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
    """載入 `llm.pt`（或同鍵 safetensors）到 `CosyVoice2Talker`。

    `cfg` 缺省為官方結構（`TalkerConfig.cosyvoice2()`）。缺少的鍵、多出的鍵（RoPE 緩衝區與
    綁定時的 `llm.model.lm_head.weight` 除外）與形狀不符一律 `ValueError`，訊息指名鍵與形狀。
    設定有融合模組而檔案中沒有任何 `fusion.*` 鍵時，融合參數以 `seed` 初始化（偏置 0）；
    只有部分 `fusion.*` 鍵時報錯。`dtype` 為參數型別（缺省用 `cfg.qwen.param_dtype`）。
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
        rules=DEFAULT_RULES if rules is None else rules,
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
            shard_model(model.fusion, mesh, DEFAULT_RULES if rules is None else rules)
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
    """把 talker 存成 `llm.pt` 佈局：副檔名 `.pt` 以 `torch.save`，否則寫 safetensors。

    `include_fusion=False` 時不寫融合參數（與官方檔相同的鍵集合）。
    """
    tensors = talker_tensors(model, include_fusion=include_fusion, dtype=dtype)
    p = Path(path)
    if p.suffix in (".pt", ".pth", ".bin"):
        import torch

        p.parent.mkdir(parents=True, exist_ok=True)
        sd = {}
        for k, v in tensors.items():
            if v.dtype == ml_dtypes.bfloat16:
                sd[k] = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
            else:
                sd[k] = torch.from_numpy(v.copy())
        torch.save(sd, p)
        return p
    # safetensors 不允許兩個鍵共用同一塊記憶體以外沒有限制；這裡每個鍵各自寫出。
    return write_safetensors(p, tensors)
