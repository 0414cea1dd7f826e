#!/usr/bin/env bash
# TPU VM 訓練的捷徑：參數原樣交給 launch/tpu/tpu_vm.py（見該檔說明）。
# 例：bash launch/tpu/run.sh all --name speak-p0 --zone us-east5-a --accelerator-type v5p-64 \
#       --version v2-alpha-tpuv5 --dry-run -- --config phase0 --config.preset=full --workdir gs://b/runs/phase0_connector
set -euo pipefail
exec python "$(dirname "$0")/tpu_vm.py" "$@"
