# GPU 服務映像：CUDA 執行環境 + 同一 CUDA 版本的 PyTorch 建置，入口為全雙工 gRPC 伺服器。
# 在專案根目錄建置與執行（模型資料夾以 -v 掛進來）：
#   docker build -f launch/docker/serving-gpu.Dockerfile -t speakllm-serving .
#   docker run --gpus all -p 50051:50051 -v "$PWD/exported:/models" -v "$PWD/demo_corpus:/voila" \
#     speakllm-serving --config.model_dir=/models/phase2_duplex \
#     --config.voila_dir=/voila/duplex/voila_tokenizer_demo
# Python 套件與 requirements.txt 完全相同，唯一的差別是 torch 改從 PyTorch 的 CUDA 套件庫安裝
# （版本同 requirements.txt 的釘選）；tests/test_setup_files.py 檢查兩者不漂移。
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH_CUDA=cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libsndfile1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch==2.13.0 \
    && pip install -r requirements.txt
COPY . .
EXPOSE 50051
ENTRYPOINT ["python", "-m", "export.serving.server", "--config", "serving", "--config.device=cuda", "--config.host=0.0.0.0"]
