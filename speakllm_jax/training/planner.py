"""全尺寸規劃器：不配置任何全尺寸陣列，估算每個裝置的記憶體並編譯訓練步。

做法與 `loop.train` 相同的那條路：以 `nnx.eval_shape` 經由任務建立抽象模型，
`state_sharding_tree` 得到狀態的分片，`make_train_step` 建立訓練步，再以
`jax.jit(..., in_shardings, out_shardings, donate_argnums=0)` 對 `ShapeDtypeStruct`
輸入做 `lower` 與 `compile`。每個裝置的參數與優化器狀態位元組由分片計算
（每個葉節點的分片形狀乘上元素大小，加總），再附上 XLA `memory_analysis()` 的數字，
並與 TPU 每顆晶片的 HBM 容量比較。

呼叫端（`launch/plan.py`）必須在匯入 JAX 之前設定
`XLA_FLAGS=--xla_force_host_platform_device_count=<網格大小>` 與 `JAX_PLATFORMS=cpu`；
本模組只在函式內匯入 JAX，所以匯入本模組本身不會初始化 JAX。
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from speakllm_jax.models.axis_rules import DEFAULT_RULES, MESH_AXES, rules_from_config

# 每顆晶片的 HBM（GiB）。
TPU_HBM_GIB: dict[str, float] = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}

GIB = 1024**3


def parse_mesh(text: str) -> dict[str, int]:
    """`fsdp=64` 或 `data=2,fsdp=16,tensor=2` → `{"data": 2, "fsdp": 16, "tensor": 2}`。

    未給的軸為 1；不接受 -1（規劃時網格大小必須明確）。
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"--mesh 的 {part!r} 應寫成 軸=大小，例如 fsdp=64")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in MESH_AXES:
            raise ValueError(f"--mesh 的軸 {name!r} 不在 {MESH_AXES} 之中")
        if name in out:
            raise ValueError(f"--mesh 的軸 {name!r} 重複")
        try:
            size = int(value)
        except ValueError as err:
            raise ValueError(f"--mesh 的 {name}={value!r} 不是整數") from err
        if size < 1:
            raise ValueError(f"--mesh 的 {name}={size} 必須 ≥ 1")
        out[name] = size
    if not out:
        raise ValueError("--mesh 是空的；例如 --mesh fsdp=64")
    return {a: out.get(a, 1) for a in MESH_AXES}


def mesh_size(mesh: Mapping[str, int]) -> int:
    """網格的裝置總數。"""
    return int(math.prod(int(v) for v in mesh.values()))


@dataclass
class PlanResult:
    """一次規劃的全部數字（位元組皆為每個裝置）。"""

    config: str
    preset: str
    mesh: dict[str, int]
    devices: int
    batch: dict[str, list[int]]
    trainable: list[str]
    params_total: int
    params_trainable: int
    params_frozen: int
    bytes_trainable_per_device: int
    bytes_frozen_per_device: int
    bytes_params_per_device: int
    bytes_opt_state_per_device: int
    bytes_state_per_device: int
    bytes_batch_per_device: int
    xla: dict[str, int] = field(default_factory=dict)
    xla_flops_per_device: float = 0.0
    peak_bytes_per_device: int = 0
    tpu: str = ""
    tpu_hbm_bytes: int = 0
    fits: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    leaves: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _path_name(path: tuple) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def per_device_bytes(
    abstract: Any, shardings: Any, prefix: str = ""
) -> tuple[int, list[dict[str, Any]]]:
    """每個裝置的位元組：對每個葉節點取分片形狀（`sharding.shard_shape`）× 元素大小後加總。

    回傳 (總位元組, 每個葉節點的明細)。分片數 = 全形狀元素數 ÷ 分片形狀元素數。
    """
    # 延後匯入：規劃器必須在呼叫端設定 XLA_FLAGS 之後才載入 JAX
    import jax

    leaves_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    leaves_s = jax.tree.leaves(shardings)
    if len(leaves_a) != len(leaves_s):
        raise ValueError(f"抽象狀態有 {len(leaves_a)} 個葉節點，分片樹有 {len(leaves_s)} 個")
    total = 0
    rows = []
    for (path, a), s in zip(leaves_a, leaves_s):
        shape = tuple(a.shape)
        local = tuple(s.shard_shape(shape))
        itemsize = np.dtype(a.dtype).itemsize
        size = int(math.prod(shape))
        local_size = int(math.prod(local))
        shards = size // local_size if local_size else 1
        nbytes = local_size * itemsize
        total += nbytes
        rows.append(
            dict(
                path=prefix + _path_name(path),
                shape=list(shape),
                dtype=str(np.dtype(a.dtype)),
                spec=str(s.spec),
                shards=shards,
                bytes_per_device=nbytes,
            )
        )
    return total, rows


def _sampled_batch(task: Any, batch: int) -> dict[str, Any]:
    """由任務的資料迭代器取一批真實資料，只保留每個欄位的型別與第 0 軸以外的形狀。"""
    # 延後匯入：規劃器必須在呼叫端設定 XLA_FLAGS 之後才載入 JAX
    import jax

    sample = next(task.make_data(0, 1))
    return {
        k: jax.ShapeDtypeStruct((batch,) + np.shape(v)[1:], np.asarray(v).dtype)
        for k, v in sample.items()
    }


def abstract_batch(
    task: Any, batch: int, frames: int | None, text_len: int | None
) -> dict[str, Any]:
    """任務批次的 `ShapeDtypeStruct`，型別與資料管線相同。

    依序：任務自己提供的 `abstract_batch(batch)`；任務的批次綱要（`task.batch_schema()`，
    維度大小取自 `task.batch_sizes(frames, text_len)`：ASR 的 `frames` 為梅爾框、全雙工的為
    25 Hz 幀）；都沒有時由資料迭代器取一批真實資料推得形狀。
    """
    # 延後匯入：規劃器必須在呼叫端設定 XLA_FLAGS 之後才載入 JAX
    import jax

    if hasattr(task, "abstract_batch"):
        return dict(task.abstract_batch(batch))
    schema = task.batch_schema()
    if schema is None:
        return _sampled_batch(task, batch)
    shapes = schema.shapes(batch, task.batch_sizes(frames, text_len))
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def _memory_analysis(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
        "host_argument_size_in_bytes",
        "host_output_size_in_bytes",
        "host_temp_size_in_bytes",
    )
    out = {}
    for n in names:
        v = getattr(stats, n, None)
        if v is not None:
            out[n] = int(v)
    return out


def plan(
    cfg: Any,
    mesh_shape: Mapping[str, int],
    *,
    batch: int | None = None,
    frames: int | None = None,
    text_len: int | None = None,
    tpu: str = "",
    config_name: str = "",
    compile_step: bool = True,
    keep_leaves: bool = False,
) -> PlanResult:
    """規劃一次訓練：分片、每裝置記憶體、（選擇性）編譯訓練步並取 XLA 記憶體分析。

    `cfg` 的 `mesh` 欄位會被 `mesh_shape` 取代；分片規則取自 `cfg.logical_axis_rules`。裝置數必須
    至少為網格大小（CPU 上以 `--xla_force_host_platform_device_count` 模擬）。
    """
    # 延後匯入：規劃器必須在呼叫端設定 XLA_FLAGS 之後才載入 JAX
    from speakllm_jax.models.sharding import use_rules

    with use_rules(rules_from_config(cfg.get("logical_axis_rules", DEFAULT_RULES))):
        return _plan(
            cfg,
            mesh_shape,
            batch=batch,
            frames=frames,
            text_len=text_len,
            tpu=tpu,
            config_name=config_name,
            compile_step=compile_step,
            keep_leaves=keep_leaves,
        )


def _plan(
    cfg: Any,
    mesh_shape: Mapping[str, int],
    *,
    batch: int | None,
    frames: int | None,
    text_len: int | None,
    tpu: str,
    config_name: str,
    compile_step: bool,
    keep_leaves: bool,
) -> PlanResult:
    # 延後匯入：規劃器必須在呼叫端設定 XLA_FLAGS 之後才載入 JAX
    import jax
    from flax import nnx

    from speakllm_jax.models.layers import count_params
    from speakllm_jax.training.optim import learning_rate_schedule, make_optimizer
    from speakllm_jax.training.sharding import make_mesh
    from speakllm_jax.training.tasks import get_task
    from speakllm_jax.training.train_state import (
        batch_shardings,
        make_init_fn,
        make_train_step,
        state_sharding_tree,
    )

    if tpu and tpu not in TPU_HBM_GIB:
        raise ValueError(f"未知的 TPU 類型 {tpu!r}；可用：{sorted(TPU_HBM_GIB)}")
    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    n = mesh_size(mesh_shape)
    if jax.device_count() < n:
        raise ValueError(
            f"網格 {mesh_shape} 需要 {n} 個裝置，目前只有 {jax.device_count()} 個；"
            f"請在匯入 JAX 之前設定 XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    with cfg.unlocked():
        for a in MESH_AXES:
            cfg.mesh[a] = mesh_shape[a]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    task = get_task(cfg)
    timings["task"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mesh = make_mesh(mesh_shape, jax.devices()[:n])
    total_steps = int(cfg.train.steps)
    tx = make_optimizer(cfg.optim, total_steps)
    schedule = learning_rate_schedule(cfg.optim, total_steps)
    patterns = tuple(cfg.trainable)
    seed = int(cfg.seed)
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    abstract, shardings = state_sharding_tree(abstract_model, patterns, tx, mesh)
    _, graphdef = make_init_fn(task, patterns, tx, seed)
    timings["abstract"] = time.perf_counter() - t0

    n_train = count_params(abstract.params)
    n_frozen = count_params(abstract.frozen)
    if n_train == 0:
        raise ValueError(f"trainable={patterns} 沒有選到任何參數")
    b_train, rows_t = per_device_bytes(abstract.params, shardings.params, "params/")
    b_frozen, rows_f = per_device_bytes(abstract.frozen, shardings.frozen, "frozen/")
    b_opt, rows_o = per_device_bytes(abstract.opt_state, shardings.opt_state, "opt_state/")
    b_state, _ = per_device_bytes(abstract, shardings)

    bsz = int(batch if batch is not None else cfg.train.batch_size)
    accum = int(cfg.train.grad_accum)
    if bsz % accum:
        raise ValueError(f"批次大小 {bsz} 不能被 train.grad_accum={accum} 整除")
    abs_batch = abstract_batch(task, bsz, frames, text_len)
    b_shard = batch_shardings(abs_batch, mesh, task.batch_axes())
    b_batch, _ = per_device_bytes(abs_batch, b_shard)

    result = PlanResult(
        config=config_name,
        preset=str(cfg.get("preset", "")),
        mesh=mesh_shape,
        devices=n,
        batch={k: list(v.shape) for k, v in abs_batch.items()},
        trainable=list(patterns),
        params_total=n_train + n_frozen,
        params_trainable=n_train,
        params_frozen=n_frozen,
        bytes_trainable_per_device=b_train,
        bytes_frozen_per_device=b_frozen,
        bytes_params_per_device=b_train + b_frozen,
        bytes_opt_state_per_device=b_opt,
        bytes_state_per_device=b_state,
        bytes_batch_per_device=b_batch,
        tpu=tpu,
        tpu_hbm_bytes=int(TPU_HBM_GIB[tpu] * GIB) if tpu else 0,
        leaves=(rows_t + rows_f + rows_o) if keep_leaves else [],
    )
    data_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    if bsz % data_shards:
        result.notes.append(
            f"批次 {bsz} 不能被 data×fsdp={data_shards} 整除：批次不分片，每個裝置都放完整批次"
            f"（請用 --batch {data_shards} 的倍數）"
        )
    result.notes.append(
        "XLA 數字來自 CPU 後端（模擬裝置），是 TPU 的近似；參數與優化器位元組是精確值"
    )
    if not compile_step:
        result.notes.append("未編譯：「需要」只含訓練狀態與批次，不含活化值與暫存")
    if compile_step:
        step_fn = make_train_step(task, graphdef, tx, schedule, accum)
        jitted = jax.jit(
            step_fn,
            in_shardings=(shardings, b_shard),
            out_shardings=(shardings, None),
            donate_argnums=(0,),
        )
        t0 = time.perf_counter()
        # 與訓練迴圈相同：追蹤時設定網格，讓活化值分片約束生效。
        with jax.set_mesh(mesh):
            lowered = jitted.lower(abstract, abs_batch)
        timings["lower"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
        timings["compile"] = time.perf_counter() - t0
        result.xla = _memory_analysis(compiled)
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0] if cost else {}
        result.xla_flops_per_device = float((cost or {}).get("flops", 0.0))
        x = result.xla
        if x:
            # 狀態被捐贈：輸出與輸入共用緩衝區（alias），不重複計算。
            result.peak_bytes_per_device = (
                x.get("argument_size_in_bytes", 0)
                + x.get("output_size_in_bytes", 0)
                - x.get("alias_size_in_bytes", 0)
                + x.get("temp_size_in_bytes", 0)
                + x.get("generated_code_size_in_bytes", 0)
            )
    need = result.peak_bytes_per_device or (b_state + b_batch)
    result.fits = {name: need <= gib * GIB for name, gib in TPU_HBM_GIB.items()}
    result.seconds = {k: round(v, 3) for k, v in timings.items()}
    return result


def _fmt_bytes(n: int) -> str:
    return f"{n:>18,d}  {n / GIB:9.3f} GiB"


def format_table(r: PlanResult) -> str:
    """人看的表格：每裝置位元組、XLA 記憶體分析、各 TPU 是否放得下。"""
    lines = [
        f"設定 {r.config}（preset={r.preset}）  網格 {r.mesh}（{r.devices} 個裝置）",
        f"批次 {r.batch}",
        f"可訓練 {r.trainable}：{r.params_trainable:,} 個參數；凍結 {r.params_frozen:,}；"
        f"合計 {r.params_total:,}",
        "",
        f"{'每裝置':<28}{'位元組':>18}  {'GiB':>13}",
        f"{'可訓練參數':<26}{_fmt_bytes(r.bytes_trainable_per_device)}",
        f"{'凍結參數（含緩衝區）':<20}{_fmt_bytes(r.bytes_frozen_per_device)}",
        f"{'參數合計':<26}{_fmt_bytes(r.bytes_params_per_device)}",
        f"{'優化器狀態':<25}{_fmt_bytes(r.bytes_opt_state_per_device)}",
        f"{'訓練狀態合計':<24}{_fmt_bytes(r.bytes_state_per_device)}",
        f"{'批次':<28}{_fmt_bytes(r.bytes_batch_per_device)}",
    ]
    if r.xla:
        lines.append("")
        lines.append("XLA memory_analysis（每裝置）")
        for k, v in r.xla.items():
            lines.append(f"  {k:<32}{_fmt_bytes(v)}")
        lines.append(
            f"  {'估計峰值（引數+輸出-別名+暫存+程式碼）':<20}{_fmt_bytes(r.peak_bytes_per_device)}"
        )
    if r.xla_flops_per_device:
        lines.append(f"  {'flops（cost_analysis）':<32}{r.xla_flops_per_device:>18,.0f}")
    lines.append("")
    need = r.peak_bytes_per_device or (r.bytes_state_per_device + r.bytes_batch_per_device)
    lines.append(f"{'TPU':<6}{'HBM/晶片':>10}  {'需要':>10}  放得下")
    for name, gib in TPU_HBM_GIB.items():
        mark = "是" if r.fits.get(name) else "否"
        star = " ←" if name == r.tpu else ""
        lines.append(f"{name:<6}{gib:>7.0f} GiB  {need / GIB:>7.2f} GiB  {mark}{star}")
    for note in r.notes:
        lines.append(f"注意：{note}")
    if r.seconds:
        lines.append("")
        lines.append("耗時（秒）：" + "，".join(f"{k} {v:.1f}" for k, v in r.seconds.items()))
    return "\n".join(lines)
