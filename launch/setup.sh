#!/usr/bin/env bash
# 新機器的安裝步驟：系統套件（espeak-ng、sox、libsndfile）與 Python 相依套件。
# 重複執行是安全的：已安裝的項目會略過。
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
ldconfig -p 2>/dev/null | grep -q libsndfile || need_apt+=(libsndfile1)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "安裝系統套件：${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-deps -e .
# 測試用的參考實作（只當數值對照的標準答案，不在產品路徑上）：s3tokenizer 的 PyTorch 版
# S3TokenizerV2；它頂層匯入的 onnx、torchaudio 在測試中以空模組替代，所以不裝它的相依套件。
python -m pip install -q --disable-pip-version-check --no-deps "s3tokenizer==0.3.0" einops
