#!/usr/bin/env bash
# 新機器的安裝步驟：系統套件（espeak-ng、sox、libsndfile；瀏覽器測試用的 chromium）與 Python 相依套件。
# 重複執行是安全的：已安裝的項目會略過。
set -euo pipefail
cd "$(dirname "$0")/.."

# 必要：espeak-ng（測試語音）、sox、libsndfile。瀏覽器頁面的測試另需 Debian 的 chromium 與
# chromium-driver，以及中文字型（截圖可讀）；沒有時 tests/test_web.py 的瀏覽器測試會略過。
need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
ldconfig -p 2>/dev/null | grep -q libsndfile || need_apt+=(libsndfile1)
browser_apt=()
command -v chromium >/dev/null 2>&1 || browser_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || browser_apt+=(chromium-driver)
fc-list :lang=zh 2>/dev/null | grep -q . || browser_apt+=(fonts-wqy-microhei)
all_apt=("${need_apt[@]}" "${browser_apt[@]}")
if [ ${#all_apt[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "沒有 root 也沒有 sudo，無法以 apt 安裝：${all_apt[*]}；請由系統管理員執行" \
      "apt-get install ${all_apt[*]}（Ubuntu 的 chromium 是 snap，另裝 Google Chrome 與對應的 chromedriver 亦可）" >&2
    if [ ${#need_apt[@]} -gt 0 ]; then exit 1; fi
  else
    echo "安裝系統套件：${all_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    if [ ${#browser_apt[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${browser_apt[@]}" >/dev/null ||
        echo "無法安裝 ${browser_apt[*]}：tests/test_web.py 的瀏覽器測試會略過" >&2
    fi
  fi
fi

python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-deps -e .
# 測試用的參考實作（只當數值對照的標準答案，不在產品路徑上）：s3tokenizer 的 PyTorch 版
# S3TokenizerV2；它頂層匯入的 onnx、torchaudio 在測試中以空模組替代，所以不裝它的相依套件。
python -m pip install -q --disable-pip-version-check --no-deps "s3tokenizer==0.3.0" einops
