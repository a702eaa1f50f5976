# syntax=docker/dockerfile:1
# Multi-stage build. CPU by default:
#   docker build -t modeld .
# For NVIDIA GPUs, build on CUDA images that carry Python 3.11+ (the toolkit to compile
# llama.cpp's CUDA backend, the runtime to run it), e.g.:
#   docker build --build-arg CUDA=1 \
#     --build-arg BASE_BUILD=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg BASE_RUN=nvidia/cuda:12.6.3-runtime-ubuntu24.04 -t modeld:cuda .
#   docker run --gpus all -p 8080:8080 -v /models:/models:ro modeld:cuda
# (On Ubuntu bases, add python3-venv to the apt-get lines.) Not built in CI: no Docker
# engine runs there.
ARG CUDA=0
ARG BASE_BUILD=python:3.11-slim-bookworm
ARG BASE_RUN=python:3.11-slim-bookworm

FROM ${BASE_BUILD} AS build
ARG CUDA
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN python -m venv /opt/modeld \
    && if [ "$CUDA" = "1" ]; then export CMAKE_ARGS="-DGGML_CUDA=on"; fi \
    && /opt/modeld/bin/pip install --no-cache-dir '.[gpu,demo]'

FROM ${BASE_RUN}
RUN useradd --system --uid 10001 --home /var/lib/modeld modeld \
    && mkdir -p /models && chown modeld /models
COPY --from=build /opt/modeld /opt/modeld
ENV PATH=/opt/modeld/bin:$PATH \
    MODELD_HOST=0.0.0.0 \
    MODELD_PORT=8080 \
    MODELD_MODELS_DIR=/models
USER modeld
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
ENTRYPOINT ["modeld", "serve"]
