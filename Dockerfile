# ortmux worker image. CPU by default; for CUDA build on an NVIDIA runtime image, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 -t ortmux:cuda .
# The worker package pins onnxruntime-gpu, which runs on CPU too and uses CUDA when it is there.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# CUDA runtime images carry no Python: take the distribution's (3.11 or newer is needed).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    && python3 -m venv /opt/ortmux

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY client ./client
COPY worker ./worker
# The LoRA kernel (docs/lora-kernel.md) is compiled here, so pods need no compiler.
RUN /opt/ortmux/bin/pip install --no-cache-dir '.[worker]' && rm -rf /src \
    && apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && /opt/ortmux/bin/python -m ortmux.worker.engine.kernels \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

# Non-root; the data dir (demo model, optimized-model cache, adapters) is a volume.
RUN groupadd --gid 10001 ortmux && useradd --uid 10001 --gid 10001 --no-create-home ortmux \
    && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
ENV ORTMUX_DATA_DIR=/data \
    PATH=/opt/ortmux/bin:$PATH \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9095
STOPSIGNAL SIGTERM
ENTRYPOINT ["ortmux", "serve"]
