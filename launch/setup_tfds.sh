#!/usr/bin/env bash
# `tfds` 指令的另一個環境（原因見 requirements-tfds.txt）；先執行 launch/setup.sh。
#   bash launch/setup_tfds.sh            # 建 .venv-tfds（TFDS_VENV 可改位置）
#   .venv-tfds/bin/tfds build speakllm_jax/data/tfds_builders/speakllm_demo --file_format array_record
# 重複執行是安全的：已安裝的項目會略過。
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TFDS_VENV:-.venv-tfds}"
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check -r requirements-tfds.txt
# `tfds` 指令：主環境的 tensorflow-datasets 同版本、不帶相依套件在這個環境再裝一份。
tfds_version="$(python -c 'import importlib.metadata as m; print(m.version("tensorflow-datasets"))')"
"$py" -m pip install -q --disable-pip-version-check --no-deps --ignore-installed \
  "tensorflow-datasets==$tfds_version"
# 讓這個環境匯入本 checkout（speakllm_jax 的建構器），不必設 PYTHONPATH。
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pwd >"$site/speakllm_repo.pth"
"$py" -c "import tensorflow, apache_beam, mlcroissant, google.protobuf as p; print('tfds 環境', '$venv', 'protobuf', p.__version__)"
