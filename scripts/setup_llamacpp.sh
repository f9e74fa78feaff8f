#!/usr/bin/env bash
# Make .venv-llama: llama.cpp's OpenAI-compatible server (llama-cpp-python, built from its PyPI sdist for
# this CPU), the other engine bench/cpu_speed.py measures against. Only that benchmark uses it; no test does.
#
#   scripts/setup_llamacpp.sh            # about ten minutes on two cores the first time; then a no-op
#
# The version is pinned; the build is llama.cpp's default for the machine it runs on (GGML_NATIVE: the
# instructions this CPU has, as a user who runs `pip install llama-cpp-python` gets).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV_LLAMA:-.venv-llama}
VERSION=0.3.36
PYTHON=${PYTHON:-python3.11}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')"; then
    exit 0
fi
echo "setup_llamacpp: building llama-cpp-python $VERSION into $VENV (about ten minutes on two cores)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-binary llama-cpp-python \
    "llama-cpp-python[server]==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('setup_llamacpp: llama-cpp-python', llama_cpp.__version__, 'in $VENV')"
