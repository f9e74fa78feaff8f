#!/usr/bin/env bash
# Install a CPU build of torchvision 0.28.0 (torch 2.13.0+cpu's) into a virtual environment, where one is at
# hand: vLLM's Qwen3.5 and Qwen3-VL model files import torchvision (through Qwen3-VL's and transformers' image
# processors), and the registries hold only CUDA-linked torchvision wheels, whose _C does not load beside a CPU
# torch ("operator torchvision::nms does not exist"). Called by scripts/setup.sh and scripts/setup_vllm034.sh.
#
#   scripts/install_torchvision_cpu.sh VENV
#
# The wheel: $TORCHVISION_CPU_WHEEL, else the one in ../shared/torchvision-cpu (the PyPI wheel with its _C
# rebuilt CPU-only from torchvision's own sources; its README says how it differs from upstream and its
# build.sh how to rebuild it). Without one, nothing is installed and the tests of those two families skip,
# saying why. Idempotent: the wheel's digest is the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=$1
WHEEL=${TORCHVISION_CPU_WHEEL:-../shared/torchvision-cpu/torchvision-0.28.0+cpu-cp311-cp311-linux_x86_64.whl}
if [[ ! -f "$WHEEL" ]]; then
    echo "setup: no CPU torchvision wheel at $WHEEL: vLLM's Qwen3.5 and Qwen3-VL cannot load in $VENV"
    exit 0
fi
torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
if [[ $torch != 2.13.0+cpu ]]; then  # the wheel's _C is built against this torch alone (a CUDA torch has its own)
    echo "setup: $VENV has torch $torch, not 2.13.0+cpu: the CPU torchvision in $WHEEL is not for it"
    exit 0
fi
stamp="$VENV/.ropeserve-torchvision"
digest=$(sha256sum "$WHEEL" | cut -d' ' -f1)
[[ "$(cat "$stamp" 2>/dev/null)" == "$digest" ]] && exit 0
"$VENV/bin/pip" install --disable-pip-version-check --quiet --no-deps --force-reinstall "$WHEEL"
"$VENV/bin/python" -c 'import torchvision, torch; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)'
echo "$digest" > "$stamp"
