# vlchat: one GPU, one process (page + /health + /metrics on port 8080), data in /data.
#
#   docker build -t vlchat .
#   docker run --gpus all -v vlchat-data:/data -p 8080:8080 vlchat
#
# Base: NVIDIA's CUDA Ubuntu image (it sets what the NVIDIA container toolkit needs) plus
# python3. The small `base` flavour is enough: the torch wheel brings its own CUDA and cuDNN
# libraries. The host driver must be new enough for that torch build's CUDA version
# (python -c "import torch; print(torch.version.cuda)"); for an older driver, build with the
# PyTorch index of a CUDA it supports, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t vlchat .
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The app's own virtualenv; first on PATH, so `python` below is /opt/venv/bin/python.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi \
    && pip install -r requirements.txt

COPY app.py ./
COPY chat/ ./chat/
COPY assets/ ./assets/

# A non-root user owns the data folder: history (vlchat.db), stored images, Gradio's upload
# cache, the browser-identity key and the Hugging Face cache (HF_HOME) all live in /data.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vlchat \
    && mkdir -p /data \
    && chown vlchat:vlchat /data

ENV VLCHAT_DATA_DIR=/data \
    VLCHAT_HOST=0.0.0.0 \
    VLCHAT_PORT=8080 \
    HF_HOME=/data/hf

VOLUME /data
EXPOSE 8080
USER vlchat

# /health answers 200 once the model is loaded and warmed up (503 before); the first start
# may download the model (about 17.5 GB), hence the long start period. chat.healthcheck reads the
# server's own flags (/proc/1/cmdline) and VLCHAT_* variables, so it follows --port and VLCHAT_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD ["/opt/venv/bin/python", "-m", "chat.healthcheck"]

CMD ["python", "app.py"]
