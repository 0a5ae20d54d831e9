# vlchat: one GPU, one process (page + /v1 + /health + /metrics on port 8080), data in /data.
#
#   docker build -t vlchat .
#   docker run --gpus all -v vlchat-data:/data -p 8080:8080 -e VLCHAT_API_KEY=change-me vlchat
#
# CUDA: requirements.txt resolves to PyPI's torch 2.14, whose wheel is built for CUDA 13.0 and
# brings its own CUDA and cuDNN libraries; the base image matches that CUDA (its
# NVIDIA_REQUIRE_CUDA makes the NVIDIA container toolkit refuse, with a clear message, a host
# driver too old for it: CUDA 13.0 needs driver 580 or newer) and torch is held to that series
# below. For an older driver, build against a CUDA it supports, both the base and the wheels:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t vlchat .
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=
# The torch series the base image's CUDA was chosen for (tests/test_config.py checks the two agree).
ARG TORCH_SERIES=2.14.*

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
RUN echo "torch==${TORCH_SERIES}" > /tmp/torch-constraint.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" -c /tmp/torch-constraint.txt torch torchvision; fi \
    && pip install -c /tmp/torch-constraint.txt -r requirements.txt \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

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
