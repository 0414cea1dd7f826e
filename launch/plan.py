"""全尺寸規劃：`python launch/plan.py --config phase0 --config.preset=full --mesh fsdp=64 [--tpu v5p]`。

在 CPU 上模擬網格大小個裝置，抽象地建立模型（不配置全尺寸陣列），計算每裝置的參數與
優化器狀態位元組，並編譯訓練步取得 XLA 記憶體分析。所有邏輯在
`speakllm_jax.training.planner`（它在函式內才匯入 JAX）；本檔先解析參數、設定模擬裝置數與
`configure_cpu_simulation()`，之後才載入設定與 JAX。
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speakllm_jax.cli import ArgumentParser, run_cli  # noqa: E402
from speakllm_jax.config import load_config  # noqa: E402
from speakllm_jax.cpu_simulation import configure_cpu_simulation  # noqa: E402
from speakllm_jax.training.planner import format_table, mesh_size, parse_mesh, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default="phase0",
        help="階段名稱（phase0…phase3）或設定檔路徑，可加 :preset=full",
    )
    parser.add_argument(
        "--mesh",
        required=True,
        help="網格，例如 fsdp=64 或 data=2,fsdp=16,tensor=2（取代 config.mesh）",
    )
    parser.add_argument("--tpu", default="", help="要比較的 TPU 類型：v4、v5e、v5p、v6e")
    parser.add_argument(
        "--batch", type=int, default=None, help="全域批次大小（預設 train.batch_size）"
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="asr：梅爾框數（預設 max_audio_seconds×100）；duplex：25 Hz 幀數（預設 data.max_frames）",
    )
    parser.add_argument(
        "--text_len", type=int, default=None, help="文字長度（預設 data.max_text_tokens）"
    )
    parser.add_argument("--no_compile", action="store_true", help="只算分片位元組，不編譯訓練步")
    parser.add_argument("--json", default="", help="把結果寫成 JSON 檔")
    parser.add_argument("--leaves", action="store_true", help="JSON 中附上每個葉節點的分片明細")
    args, overrides = parser.parse_known_args(argv)

    # 先解析網格，再在匯入 JAX 之前設定模擬裝置數（full 預設的設定會匯入模型，所以設定在
    # 設好環境變數之後才載入）。
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as err:
        parser.error(str(err))
    n = mesh_size(mesh)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "jax" in sys.modules:
        raise RuntimeError("JAX 在設定 XLA_FLAGS 之前就被匯入了")
    configure_cpu_simulation()

    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    result = plan(
        cfg,
        mesh,
        batch=args.batch,
        frames=args.frames,
        text_len=args.text_len,
        tpu=args.tpu,
        config_name=args.config,
        compile_step=not args.no_compile,
        keep_leaves=args.leaves,
    )
    result.seconds["total"] = round(time.perf_counter() - t0, 3)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        print(f"JSON：{path}")
    if args.tpu and not result.fits.get(args.tpu, False):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
