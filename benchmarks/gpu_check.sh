#!/usr/bin/env bash
# GPU 檢查：有 CUDA GPU 時在 GPU 上跑同一個服務基準（bench_serving.py 的排程比較，
# 伺服器 --config.device=cuda）與 H100 紙上估算；沒有 GPU 時印一行說明並以 0 結束。
# 用法：bash benchmarks/gpu_check.sh [bench_serving.py 的其他參數…]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" - <<'PY'
import sys

import torch

sys.exit(0 if torch.cuda.is_available() else 1)
PY
then
  echo "沒有可用的 CUDA GPU（torch.cuda.is_available() 為 False）：略過 GPU 基準，未量測任何數字。"
  exit 0
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true
exec "$PY" benchmarks/bench_serving.py --no-serving --no-heads --frame-steps 0 --sched \
  --server-arg=--config.device=cuda "$@"
