"""Hugging Face 檢查點的通用讀寫（與模型無關）。

官方資料夾的樣子：`config.json` 加上 `model.safetensors`（單檔），或
`model.safetensors.index.json`（`weight_map`：HF 鍵 → 分片檔名）加上多個分片。
本模組自行解析 safetensors 檔頭並以 `np.memmap` 記憶體映射張量，支援
F64/F32/F16/BF16/F8 與整數型別（bf16 經 `ml_dtypes`），讀取時不會把整個檔案載入記憶體。

公開 API：

- `read_config(path) -> dict`、`write_config(path, cfg)`：讀寫資料夾中的 `config.json`。
- `SafetensorsFolder(path)`：開啟單檔或分片的 safetensors；`keys()`、`shape(key)`、
  `dtype(key)`、`get(key) -> np.ndarray`（唯讀的記憶體映射視圖）、`key in folder`。
- `ParamMap(hf, perm=None)`：一個 NNX 參數對應的 HF 鍵。`hf` 為單一鍵字串，或一串鍵
  （堆疊層 i=0..L-1，於第 0 軸堆疊）；`perm` 為套在「單一 HF 張量」上的軸排列
  （例如線性層 `(1, 0)`：HF `[out, in]` → NNX `[in, out]`；卷積 `(2, 1, 0)`），
  存檔時自動套用反排列。
- `KeyMap = Mapping[str, ParamMap | str | Sequence[str]]`：鍵為 NNX 參數路徑，
  以 "." 連接（例如 `"model.layers.attn.q_proj.kernel"`，與 `nnx.to_flat_state` 的路徑相同）。
- `load_params(abstract_model, key_map, path, dtype=None, mesh=None, rules=None,
  ignore=()) -> nnx.Module`：把檢查點載入以 `nnx.eval_shape` 建立的抽象模型。
  缺少的鍵、多出的鍵（不符合 `ignore` 中任何正規表示式者）、形狀不符的鍵、
  以及沒有對應的 NNX 參數，一律以 `ValueError` 報錯並指名鍵與兩邊形狀。
  浮點參數轉為 `dtype`（未給時用抽象模型的參數型別）。給了 `mesh` 時，每個參數依
  `speakllm_jax.models.sharding.state_shardings` 的分片（`rules` 未給時為目前的規則表：訓練中
  是設定的 `logical_axis_rules`，否則 `DEFAULT_RULES`），以
  `jax.make_array_from_callback` 從記憶體映射逐參數放置，不會在單一裝置上組出整個模型；
  未給 `mesh` 時放在預設裝置。
- `save_params(model, key_map, path, config=None, max_shard_bytes=..., dtype=None)`：
  以反向對應把 NNX 模型存成 safetensors（超過 `max_shard_bytes` 時分片並寫出 index json），
  再寫 `config.json`；`transformers` 的 `from_pretrained` 可直接讀取。
- `write_safetensors(path, tensors)`：把 `{鍵: np.ndarray}` 寫成單一 safetensors 檔。

各模型的鍵對應放在各自的模組（例如 `qwen2_hf.py`、`whisper_hf.py`）。
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from speakllm_jax.models.sharding import active_rules, rules_from_config, state_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# safetensors 型別字串 ↔ numpy 型別。
_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in _ST_TO_NP.items()}


# ---------------------------------------------------------------- config.json


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """讀取資料夾（或直接指定的檔案）中的 `config.json`。"""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"找不到設定檔 {p}")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"設定檔 {p} 不是合法的 JSON：{e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"設定檔 {p} 的最上層必須是物件")
    return cfg


def write_config(path: str | os.PathLike, cfg: Mapping[str, Any]) -> Path:
    """把設定寫成資料夾中的 `config.json`（排序鍵、縮排 2）。"""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    out = p / CONFIG_FILE
    with open(out, "w", encoding="utf-8") as f:
        json.dump(dict(cfg), f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return out


# ---------------------------------------------------------------- safetensors 讀取


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # 檔案內的絕對位元組位置
    end: int


def _parse_header(file: Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"safetensors 檔 {file} 太短，沒有檔頭長度")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"safetensors 檔 {file} 的檔頭長度 {n} 不合理（檔案 {size} 位元組）")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"safetensors 檔 {file} 的檔頭不是合法的 JSON：{e}") from e
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, _TensorInfo] = {}
    for key, entry in header.items():
        st = entry.get("dtype")
        if st not in _ST_TO_NP:
            raise ValueError(f"safetensors 檔 {file} 的鍵 {key} 使用不支援的型別 {st!r}")
        dt = _ST_TO_NP[st]
        shape = tuple(int(s) for s in entry["shape"])
        b, e = (int(x) for x in entry["data_offsets"])
        if e - b != math.prod(shape) * dt.itemsize or base + e > size:
            raise ValueError(
                f"safetensors 檔 {file} 的鍵 {key} 位移 {b}..{e} 與形狀 {shape} {st} 不符或超出檔案"
            )
        infos[key] = _TensorInfo(file, dt, shape, base + b, base + e)
    return infos, meta


class SafetensorsFolder:
    """單檔或分片 safetensors 的唯讀存取（記憶體映射，逐張量讀取）。

    `path` 可以是資料夾（優先找 `model.safetensors.index.json`，否則 `model.safetensors`）、
    一個 `.safetensors` 檔，或一個 index json。
    """

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.is_dir():
            if (p / INDEX_FILE).is_file():
                p = p / INDEX_FILE
            elif (p / SINGLE_FILE).is_file():
                p = p / SINGLE_FILE
            else:
                raise FileNotFoundError(f"資料夾 {path} 中沒有 {SINGLE_FILE} 也沒有 {INDEX_FILE}")
        if not p.is_file():
            raise FileNotFoundError(f"找不到檢查點檔 {p}")
        self.path = p
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, _TensorInfo] = {}
        self._maps: dict[Path, np.memmap] = {}
        if p.name.endswith(".json"):
            self._open_index(p)
        else:
            self._infos, self.metadata = _parse_header(p)

    def _open_index(self, index: Path) -> None:
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"索引檔 {index} 格式錯誤（需要 weight_map）：{e}") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            shard = index.parent / name
            if not shard.is_file():
                raise FileNotFoundError(f"索引檔 {index} 指到的分片 {shard} 不存在")
            infos, meta = _parse_header(shard)
            self.metadata.update(meta)
            for key, info in infos.items():
                if key in weight_map and weight_map[key] != name:
                    continue
                self._infos[key] = info
        missing = [k for k in weight_map if k not in self._infos]
        if missing:
            raise ValueError(f"索引檔 {index} 列出的鍵 {missing[:5]} 不在其分片中")

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def _info(self, key: str) -> _TensorInfo:
        if key not in self._infos:
            raise KeyError(f"檢查點 {self.path} 中沒有鍵 {key}")
        return self._infos[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self._info(key).dtype

    def get(self, key: str) -> np.ndarray:
        """回傳唯讀的記憶體映射視圖；需要副本時自行 `np.array(...)`。"""
        info = self._info(key)
        mm = self._maps.get(info.file)
        if mm is None:
            mm = np.memmap(info.file, dtype=np.uint8, mode="r")
            self._maps[info.file] = mm
        return mm[info.begin : info.end].view(info.dtype).reshape(info.shape)


# ---------------------------------------------------------------- safetensors 寫出


def _st_dtype(dt: Any, key: str) -> str:
    d = np.dtype(dt)
    if d not in _NP_TO_ST:
        raise ValueError(f"鍵 {key} 的型別 {d} 無法寫入 safetensors")
    return _NP_TO_ST[d]


def _header_bytes(entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dt, shape in entries:
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        header[key] = {
            "dtype": _st_dtype(dt, key),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_file(
    file: Path,
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    fetch: Any,
) -> None:
    """先寫檔頭，再逐一呼叫 `fetch(key)` 取得張量寫入，避免同時持有所有張量。"""
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header_bytes(entries))
        for key, dt, shape in entries:
            arr = np.ascontiguousarray(np.asarray(fetch(key)))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dt):
                raise ValueError(
                    f"鍵 {key} 寫出時形狀／型別 {arr.shape} {arr.dtype} 與預期 {shape} {dt} 不符"
                )
            f.write(arr.tobytes())
    os.replace(tmp, file)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> Path:
    """把 `{鍵: 陣列}` 寫成單一 safetensors 檔（metadata format=pt）。"""
    entries = [(k, np.asarray(v).dtype, tuple(np.shape(v))) for k, v in tensors.items()]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_file(out, entries, lambda k: tensors[k])
    return out


# ---------------------------------------------------------------- 鍵對應


@dataclass(frozen=True)
class ParamMap:
    """一個 NNX 參數對應的 HF 張量。

    `hf`：單一 HF 鍵，或一串鍵（堆疊層，依序於第 0 軸堆疊）。
    `perm`：套在單一 HF 張量上得到 NNX（每層）形狀的軸排列；None 表示不變。
    """

    hf: str | tuple[str, ...]
    perm: tuple[int, ...] | None = None

    @property
    def stacked(self) -> bool:
        return not isinstance(self.hf, str)

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    def hf_shape(self, nnx_layer_shape: Sequence[int]) -> tuple[int, ...]:
        """由 NNX（每層）形狀推回 HF 張量形狀。"""
        shape = tuple(nnx_layer_shape)
        if self.perm is None:
            return shape
        inv = np.argsort(self.perm)
        return tuple(shape[i] for i in inv)

    def to_nnx(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.perm is None else np.transpose(arr, self.perm)

    def to_hf(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.perm is None else np.transpose(arr, np.argsort(self.perm))


KeyMap = Mapping[str, "ParamMap | str | Sequence[str]"]


def transposed(hf: str | Sequence[str]) -> ParamMap:
    """線性層權重：HF `[out, in]` ↔ NNX kernel `[in, out]`。"""
    return ParamMap(hf if isinstance(hf, str) else tuple(hf), (1, 0))


def stacked_keys(template: str, num_layers: int) -> tuple[str, ...]:
    """`"model.layers.{i}.mlp.up_proj.weight"` → 每層一個鍵。"""
    return tuple(template.format(i=i) for i in range(num_layers))


def _as_param_map(v: ParamMap | str | Sequence[str]) -> ParamMap:
    if isinstance(v, ParamMap):
        return v
    if isinstance(v, str):
        return ParamMap(v)
    return ParamMap(tuple(v))


def path_str(path: Iterable[Any]) -> str:
    """NNX 狀態路徑（元組）→ 以 "." 連接的字串。"""
    return ".".join(str(p) for p in path)


def _flat_variables(state: Any) -> dict[str, Any]:
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def _target_dtype(var_dtype: Any, dtype: Any) -> np.dtype:
    d = np.dtype(var_dtype)
    if dtype is not None and jnp.issubdtype(d, jnp.floating):
        return np.dtype(dtype)
    return d


# ---------------------------------------------------------------- 載入


def load_params(
    abstract_model: nnx.Module,
    key_map: KeyMap,
    path: str | os.PathLike | SafetensorsFolder,
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    ignore: Sequence[str] = (),
) -> nnx.Module:
    """把 HF safetensors 載入抽象 NNX 模型，回傳具體模型。

    `abstract_model` 以 `nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))` 建立，
    其狀態中每個變數都必須出現在 `key_map` 中。`ignore` 是允許存在但不載入的 HF 鍵
    之正規表示式（`re.fullmatch`）。`rules` 為分片規則（設定的 `logical_axis_rules` 格式）；
    未給時用目前的規則表（訓練中為設定的 `logical_axis_rules`，否則 `DEFAULT_RULES`）。
    """
    rules = active_rules() if rules is None else rules_from_config(rules)
    folder = path if isinstance(path, SafetensorsFolder) else SafetensorsFolder(path)
    graphdef, abstract_state = nnx.split(abstract_model)
    variables = _flat_variables(abstract_state)
    maps = {k: _as_param_map(v) for k, v in key_map.items()}

    unknown_paths = sorted(set(maps) - set(variables))
    if unknown_paths:
        raise ValueError(
            f"鍵對應中的 NNX 路徑 {unknown_paths} 不在模型中；模型有 {sorted(variables)}"
        )
    unmapped = sorted(set(variables) - set(maps))
    if unmapped:
        raise ValueError(f"NNX 參數 {unmapped} 沒有對應的 HF 鍵")

    # 先完整檢查鍵與形狀，再開始搬資料。
    used: set[str] = set()
    for name, pm in maps.items():
        value = variables[name].get_value()
        shape = tuple(value.shape)
        if pm.stacked:
            if not shape or shape[0] != len(pm.keys):
                raise ValueError(
                    f"NNX 參數 {name} 形狀 {shape} 的第 0 軸應等於堆疊的 HF 鍵數 {len(pm.keys)}"
                )
            layer_shape = shape[1:]
        else:
            layer_shape = shape
        expected = pm.hf_shape(layer_shape)
        for key in pm.keys:
            if key not in folder:
                raise ValueError(
                    f"檢查點 {folder.path} 缺少鍵 {key}（NNX 參數 {name}，預期形狀 {expected}，"
                    f"實際：不存在）"
                )
            found = folder.shape(key)
            if found != expected:
                raise ValueError(
                    f"鍵 {key} 形狀不符：預期 {expected}，檢查點中為 {found}（NNX 參數 {name} {shape}）"
                )
            used.add(key)
    patterns = [re.compile(p) for p in ignore]
    unexpected = [
        k for k in folder.keys() if k not in used and not any(p.fullmatch(k) for p in patterns)
    ]
    if unexpected:
        shapes = {k: folder.shape(k) for k in unexpected[:10]}
        raise ValueError(
            f"檢查點 {folder.path} 有模型沒有的鍵（預期：不存在；實際形狀）：{shapes}"
            + (f" 等共 {len(unexpected)} 個" if len(unexpected) > 10 else "")
        )

    shardings = (
        _flat_variables(state_shardings(abstract_state, mesh, rules)) if mesh is not None else None
    )

    pure: dict[str, Any] = {}
    for name, pm in maps.items():
        value = variables[name].get_value()
        shape = tuple(value.shape)
        target = _target_dtype(value.dtype, dtype)

        def layer(key: str, pm: ParamMap = pm) -> np.ndarray:
            return pm.to_nnx(folder.get(key))

        if shardings is None:
            if pm.stacked:
                host = np.stack([layer(k).astype(target) for k in pm.keys])
            else:
                host = np.asarray(layer(pm.keys[0]), dtype=target)
            pure[name] = jnp.asarray(host)
        else:
            sharding = shardings[name].get_value()

            def callback(idx: tuple, pm: ParamMap = pm, target: np.dtype = target) -> np.ndarray:
                if pm.stacked:
                    keys = pm.keys[idx[0]] if idx else pm.keys
                    rest = tuple(idx[1:])
                    return np.stack([np.asarray(layer(k)[rest], dtype=target) for k in keys])
                return np.asarray(layer(pm.keys[0])[tuple(idx)], dtype=target)

            pure[name] = jax.make_array_from_callback(shape, sharding, callback)

    flat = nnx.to_flat_state(abstract_state)
    new_flat = [(p, v.replace(pure[path_str(p)])) for p, v in flat]
    state = nnx.from_flat_state(new_flat)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------- 存檔


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def save_params(
    model: nnx.Module,
    key_map: KeyMap,
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Any = None,
) -> Path:
    """以反向鍵對應把模型存成 HF 資料夾（safetensors + 選擇性的 config.json）。

    總大小超過 `max_shard_bytes` 時分成 `model-0000i-of-0000n.safetensors`，並寫出
    `model.safetensors.index.json`。`dtype` 給定時浮點張量轉成該型別。
    多主機時每個程序都會收集完整陣列，但只有程序 0 寫檔。
    """
    out = Path(path)
    state = nnx.state(model)
    variables = _flat_variables(state)
    maps = {k: _as_param_map(v) for k, v in key_map.items()}
    missing = sorted(set(maps) - set(variables))
    if missing:
        raise ValueError(f"鍵對應中的 NNX 路徑 {missing} 不在模型中")

    # (HF 鍵, 型別, 形狀, NNX 路徑, 層索引或 None)
    plan: list[tuple[str, np.dtype, tuple[int, ...], str, int | None]] = []
    for name, pm in maps.items():
        value = variables[name].get_value()
        target = _target_dtype(value.dtype, dtype)
        if pm.stacked:
            hf_shape = pm.hf_shape(value.shape[1:])
            for i, key in enumerate(pm.keys):
                plan.append((key, target, hf_shape, name, i))
        else:
            plan.append((pm.keys[0], target, pm.hf_shape(value.shape), name, None))
    seen: set[str] = set()
    for key, *_ in plan:
        if key in seen:
            raise ValueError(f"鍵對應中 HF 鍵 {key} 出現不只一次")
        seen.add(key)

    # 依大小分組。
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, dt, shape, _, _) in enumerate(plan):
        nbytes = math.prod(shape) * dt.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    total = sum(math.prod(s) * d.itemsize for _, d, s, _, _ in plan)

    cache: dict[str, np.ndarray] = {}
    by_key = {p[0]: p for p in plan}

    def fetch(key: str) -> np.ndarray:
        _, dt, _, name, layer = by_key[key]
        if name not in cache:
            cache.clear()
            cache[name] = _host(variables[name].get_value())
        arr = cache[name] if layer is None else cache[name][layer]
        return maps[name].to_hf(arr).astype(dt)

    # 所有程序都參與收集（多主機時 allgather 是集體運算），只有程序 0 寫檔。
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        # 只刪除本格式的舊檔（單檔、`model-XXXXX-of-XXXXX` 分片、索引），
        # 不動同資料夾中其他名稱以 model 開頭的 safetensors（例如語音頭）。
        stale = [out / SINGLE_FILE, out / INDEX_FILE]
        stale += [p for p in out.glob("model-*-of-*.safetensors") if _SHARD_RE.fullmatch(p.name)]
        for old in stale:
            if old.exists():
                old.unlink()
    if len(groups) == 1:
        entries = [plan[i][:3] for i in groups[0]]
        if writer:
            _write_file(out / SINGLE_FILE, entries, fetch)
        else:
            for key, *_ in entries:
                fetch(key)
    else:
        weight_map: dict[str, str] = {}
        n = len(groups)
        for g, idxs in enumerate(groups):
            fname = f"model-{g + 1:05d}-of-{n:05d}.safetensors"
            entries = [plan[i][:3] for i in idxs]
            if writer:
                _write_file(out / fname, entries, fetch)
            else:
                for key, *_ in entries:
                    fetch(key)
            weight_map.update({plan[i][0]: fname for i in idxs})
        if writer:
            with open(out / INDEX_FILE, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "metadata": {"total_size": total},
                        "weight_map": dict(sorted(weight_map.items())),
                    },
                    f,
                    indent=2,
                )
                f.write("\n")
    if writer and config is not None:
        write_config(out, config)
    return out
