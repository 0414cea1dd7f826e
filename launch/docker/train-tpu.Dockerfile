# TPU 訓練映像：jax[tpu]（含 libtpu），入口為 launch/train.py；在每個 TPU VM worker 上執行。
# 在專案根目錄建置與執行：
#   docker build -f launch/docker/train-tpu.Dockerfile -t speakllm-train-tpu .
#   docker run --privileged --net=host -v "$PWD/runs:/app/runs" speakllm-train-tpu \
#     --config phase2 --config.preset=full --config.mesh.fsdp=8
# Python 套件與 requirements.txt 完全相同，差別只有兩處平台替換：jax 加上 [tpu] extra（版本同
# requirements.txt），torch 改從 PyTorch 的 CPU 套件庫安裝（只在抽語音碼的子程序中使用）。
FROM python:3.11-slim
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng sox libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install "jax[tpu]>=0.10.2"
COPY . .
ENTRYPOINT ["python", "launch/train.py"]
CMD ["--config", "phase2"]
