"""訓練主迴圈：`launch/train.py` 的全部邏輯。

同一個指令在筆電 CPU（tiny 預設）與 TPU pod（full 預設）上走同一條路：
建網格 → 以 jit + out_shardings 直接在網格上初始化 → 有檢查點就恢復（含資料順序與 RNG），
否則依設定載入預訓練權重或前一階段的檢查點 → 逐步訓練、記錄、存檔。
收到 SIGTERM（TPU 搶佔）時存下當前步並乾淨地結束。
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from speakllm_jax.config import config_to_dict
from speakllm_jax.models.layers import count_params
from speakllm_jax.models.sharding import DEFAULT_RULES, rules_from_config, use_rules
from speakllm_jax.training import distributed
from speakllm_jax.training.checkpointing import Checkpointer, overlay_params
from speakllm_jax.training.config_io import write_resolved
from speakllm_jax.training.metrics_log import MetricsLogger
from speakllm_jax.training.optim import learning_rate_schedule, make_optimizer
from speakllm_jax.training.sharding import make_mesh
from speakllm_jax.training.tasks import get_task
from speakllm_jax.training.tasks.base import Task
from speakllm_jax.training.train_state import (
    TrainState,
    batch_shardings,
    make_eval_step,
    make_init_fn,
    make_train_step,
    state_from_model,
    state_sharding_tree,
)


class TooManyBadSteps(RuntimeError):
    """NaN/Inf 步數超過 `train.max_bad_steps`。"""


@dataclass
class TrainResult:
    """一次 `train()` 的結果摘要。"""

    workdir: Path
    final_step: int
    losses: list[float] = field(default_factory=list)
    bad_steps: int = 0
    preempted: bool = False
    resumed_from: int | None = None
    state: Any = None
    graphdef: Any = None


class _StopFlag:
    """SIGTERM 時設旗標，讓迴圈在步與步之間存檔後結束。"""

    def __init__(self) -> None:
        self.stop = False
        self._old: Any = None

    def install(self) -> None:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # 非主執行緒時無法安裝
            self._old = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """由各程序的本地批次組出全域陣列。"""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, global_shape)
    return out


def _inject_nan(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    for k, v in batch.items():
        if np.issubdtype(np.asarray(v).dtype, np.floating):
            out[k] = np.full_like(v, np.nan)
            return out
    raise ValueError("批次中沒有浮點欄位可注入 NaN")


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def run_eval(
    task: Task,
    state: TrainState,
    eval_fn: Any,
    mesh: Any,
    max_batches: int,
) -> dict[str, float]:
    """在評估資料上跑一遍（至多 `max_batches` 批），回傳以權重平均的指標。"""
    data = task.make_eval_data(jax.process_index(), jax.process_count())
    if data is None:
        return {}
    sums: dict[str, float] = {}
    for i, local in enumerate(data):
        if i >= max_batches:
            break
        shard = batch_shardings(local, mesh, task.batch_axes())
        batch = _global_batch(local, shard)
        with jax.set_mesh(mesh):
            out = jax.device_get(eval_fn(state, batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(sums.pop("weight", 0.0), 1e-9)
    total = sums.pop("loss_sum", 0.0)
    return {"eval_loss": total / weight, **{f"eval_{k}": v / weight for k, v in sums.items()}}


def _initial_state(
    task: Task,
    cfg: ml_collections.ConfigDict,
    tx: Any,
    shardings: TrainState,
    init_fn: Any,
) -> TrainState:
    patterns = tuple(cfg.trainable)
    if cfg.checkpoint.init_from:
        state = jax.jit(init_fn, out_shardings=shardings)()
        prev = Checkpointer(Path(cfg.checkpoint.init_from) / "checkpoints", async_save=False)
        source = prev.restore_params()
        prev.close()
        params, copied_p, bad_p = overlay_params(state.params, source)
        frozen, copied_f, bad_f = overlay_params(state.frozen, source)
        if not copied_p and not copied_f:
            raise ValueError(f"{cfg.checkpoint.init_from} 的檢查點與本模型沒有任何相同路徑的參數")
        if bad_p or bad_f:
            print(f"形狀不同而未沿用的參數：{bad_p + bad_f}")
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        return state.replace(params=params, frozen=frozen, opt_state=opt_state)
    needs_pretrained = any(
        cfg.model.get(k, "") for k in ("whisper_path", "qwen_path", "talker_path")
    )
    if needs_pretrained:
        model = task.build_model(nnx.Rngs(int(cfg.seed)))
        model = task.load_pretrained(model)
        state = state_from_model(model, patterns, tx, int(cfg.seed))
        return jax.device_put(state, shardings)
    return jax.jit(init_fn, out_shardings=shardings)()


def use_compilation_cache(train_cfg: ml_collections.ConfigDict) -> str | None:
    """`train.compilation_cache_dir` 非空時，JAX 的持久編譯快取放在該資料夾（MaxText 的
    `jax_cache_dir`）：同一份設定重跑、恢復或多次啟動時，訓練步直接讀回已編譯的程式。

    只在本程序第一次編譯之前設定才生效（`launch/train.py` 即如此）；空字串不改 JAX 的設定
    （例如環境變數 `JAX_COMPILATION_CACHE_DIR`）。回傳設定的資料夾或 None。
    """
    path = str(train_cfg.get("compilation_cache_dir", "") or "")
    if not path:
        return None
    path = str(Path(path).expanduser())
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    keep_state: bool = False,
) -> TrainResult:
    """執行（或恢復）一次訓練，回傳摘要；分片規則取自 `cfg.logical_axis_rules`。"""
    with use_rules(rules_from_config(cfg.get("logical_axis_rules", DEFAULT_RULES))):
        return _train(cfg, workdir, progress=progress, keep_state=keep_state)


def _train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool,
    keep_state: bool,
) -> TrainResult:
    use_compilation_cache(cfg.train)
    distributed.maybe_initialize(cfg.distributed)
    workdir = Path(workdir)
    if jax.process_index() == 0:
        write_resolved(cfg, workdir)
    task = get_task(cfg)
    mesh = make_mesh(dict(cfg.mesh))
    total_steps = int(cfg.train.steps)
    tx = make_optimizer(cfg.optim, total_steps)
    schedule = learning_rate_schedule(cfg.optim, total_steps)
    patterns = tuple(cfg.trainable)
    batch_size = int(cfg.train.batch_size)
    if batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={batch_size} 不能被程序數 {jax.process_count()} 整除")

    # 網格只透過明確的分片使用，不設全域網格（NNX 會把邏輯名當成網格軸）。
    abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(int(cfg.seed))))
    abstract, shardings = state_sharding_tree(abstract_model, patterns, tx, mesh)
    init_fn, graphdef = make_init_fn(task, patterns, tx, int(cfg.seed))
    data = task.make_data(jax.process_index(), jax.process_count())
    ckpt = Checkpointer(
        workdir / "checkpoints",
        every_steps=int(cfg.checkpoint.every_steps),
        max_to_keep=int(cfg.checkpoint.max_to_keep),
        keep_period=int(cfg.checkpoint.keep_period),
        async_save=bool(cfg.checkpoint.async_save),
    )
    resumed = ckpt.latest_step()
    if resumed is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        state, _ = ckpt.restore(resumed, target, data)
    else:
        state = _initial_state(task, cfg, tx, shardings, init_fn)

    n_train = count_params(abstract.params)
    n_all = n_train + count_params(abstract.frozen)
    logger = MetricsLogger(
        workdir,
        tensorboard=bool(cfg.logging.tensorboard),
        wandb_project=str(cfg.logging.wandb_project),
        use_wandb=bool(cfg.logging.wandb),
        config=config_to_dict(cfg),
    )
    if jax.process_index() == 0:
        print(
            f"[{cfg.phase}] 參數 {n_all:,}（可訓練 {n_train:,}）；網格 {dict(mesh.shape)}；"
            + (
                f"從第 {resumed} 步恢復"
                if resumed is not None
                else f"由 {cfg.checkpoint.init_from} 初始化"
                if cfg.checkpoint.init_from
                else "從頭開始"
            )
        )

    step_fn = make_train_step(task, graphdef, tx, schedule, int(cfg.train.grad_accum))
    jit_step = None
    eval_fn = None
    stop = _StopFlag()
    stop.install()
    start = int(jax.device_get(state.step))
    result = TrainResult(workdir=workdir, final_step=start, resumed_from=resumed)
    nan_steps = {int(s) for s in cfg.train.inject_nan_steps}
    bar = tqdm(
        total=total_steps,
        initial=start,
        disable=not progress or jax.process_index() != 0,
        desc=cfg.phase,
        dynamic_ncols=True,
    )
    cfg_dict = config_to_dict(cfg)
    tokens_seen = 0
    t0 = time.perf_counter()
    last_saved = start if resumed is not None else -1
    try:
        step = start
        while step < total_steps:
            local = next(data)
            if step + 1 in nan_steps:
                local = _inject_nan(local)
            if jit_step is None:
                b_shard = batch_shardings(
                    {k: np.asarray(v)[:1].repeat(batch_size, 0) for k, v in local.items()},
                    mesh,
                    task.batch_axes(),
                )
                jit_step = jax.jit(
                    step_fn,
                    in_shardings=(shardings, b_shard),
                    out_shardings=(shardings, None),
                    donate_argnums=(0,),
                )
            batch = _global_batch(local, b_shard)
            # 追蹤時設定網格，讓模型內的活化值分片約束（layers.constrain）生效。
            with jax.set_mesh(mesh):
                state, metrics = jit_step(state, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            tokens_seen += task.tokens_in(local) * jax.process_count()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            metrics["tokens_per_s"] = tokens_seen / elapsed
            if metrics["finite"]:
                result.losses.append(metrics["loss"])
            else:
                result.bad_steps += 1
                print(f"第 {step} 步的損失或梯度不是有限值，未套用更新（累計 {result.bad_steps}）")
            every = int(cfg.train.eval_every)
            if every > 0 and (step % every == 0 or step == total_steps):
                if eval_fn is None:
                    eval_fn = jax.jit(make_eval_step(task, graphdef))
                metrics.update(run_eval(task, state, eval_fn, mesh, int(cfg.train.eval_batches)))
            if step % max(int(cfg.train.log_every), 1) == 0 or step == total_steps:
                logger.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if ckpt.save(step, state, data, cfg_dict):
                last_saved = step
            if int(jax.device_get(state.bad_steps)) > int(cfg.train.max_bad_steps):
                ckpt.wait()
                raise TooManyBadSteps(
                    f"累計 {int(jax.device_get(state.bad_steps))} 個 NaN/Inf 步，超過 "
                    f"train.max_bad_steps={cfg.train.max_bad_steps}；最後的好檢查點在 {ckpt.directory}"
                )
            if _any_process(stop.stop) or ckpt.reached_preemption(step):
                if last_saved != step:
                    ckpt.save(step, state, data, cfg_dict, force=True)
                ckpt.wait()
                result.preempted = True
                print(f"收到停止訊號：已在第 {step} 步存檔後結束。")
                break
        result.final_step = step
        if not result.preempted and last_saved != step and step > start:
            ckpt.save(step, state, data, cfg_dict, force=True)
    finally:
        bar.close()
        stop.uninstall()
        ckpt.close()
        if cfg.logging.plot:
            logger.plot()
        logger.close()
    result.bad_steps = int(jax.device_get(state.bad_steps))
    if keep_state:
        result.state = state
        result.graphdef = graphdef
    return result
