"""Which dtype vLLM's CPU engine runs in, chosen by the CPU, and what its KV cache then needs.

vLLM's CPU kernels compute bfloat16 with native instructions only where the CPU has them (the
``avx512_bf16`` or ``amx_bf16`` flag); elsewhere (an AVX2-only CPU) bfloat16 is emulated and runs about 4x
slower than float32. So ``auto``, the default of the embedded engine and of the compose stack's engine,
means bfloat16 on such a CPU and float32 otherwise; any other dtype is taken as given::

    dtype, line = resolve_dtype("auto", read_cpu_flags(), override="--engine-dtype")
    # "float32", "dtype float32: this CPU has no native bfloat16 (no avx512_bf16/amx_bf16 flag); ..."

float32 doubles the KV cache's bytes per token; :func:`kvcache_gib_needed` is the arithmetic (the default
``engine_kvcache_gib`` of 4 GiB holds one full 65,536-token request of the default model in float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

AUTO = "auto"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 instructions
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024 ** 3


def choose_cpu_dtype(flags: Iterable[str]) -> tuple[str, str]:
    """``("bfloat16", reason)`` where ``flags`` (a CPU's /proc/cpuinfo flags) name a native bfloat16
    instruction set, else ``("float32", reason)``."""
    present = set(flags)
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in present]
    if native:
        return "bfloat16", f"this CPU has native bfloat16 ({', '.join(native)})"
    return "float32", f"this CPU has no native bfloat16 (no {'/'.join(NATIVE_BF16_FLAGS)} flag)"


def resolve_dtype(requested: str, flags: Iterable[str], *, override: str) -> tuple[str, str]:
    """The dtype to run and the one log line saying why: ``requested`` as given unless it is ``auto``,
    which :func:`choose_cpu_dtype` decides; ``override`` names the setting that changes it."""
    if requested != AUTO:
        return requested, f"dtype {requested}: set explicitly ({override})"
    dtype, reason = choose_cpu_dtype(flags)
    return dtype, f"dtype {dtype}: {reason}; set {override} to override"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first ``flags`` line of /proc/cpuinfo's text (x86); empty when there is none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo cannot be read (then ``auto`` is float32).

    Read directly rather than through py-cpuinfo (in the lock as a vLLM dependency, not ours): that
    library runs itself again in a subprocess and executes generated CPUID code, over a second, to report
    the same flags."""
    try:
        return parse_cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return frozenset()


def kv_bytes_per_token(dtype: str, *, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> int:
    """KV-cache bytes of one token: 2 (K and V) x layers x KV heads x head_dim x bytes per element.
    The defaults are the default model's (SmolLM2-135M: 30 layers, 3 KV heads of 64), 11,520 elements."""
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def kvcache_gib_needed(tokens: int, dtype: str, *, margin: float = 1.25, **shape: int) -> int:
    """Whole GiB of KV cache that hold ``tokens`` tokens in ``dtype`` with ``margin`` to spare (vLLM's CPU
    cache is allocated in blocks of 128 tokens). 65,536 tokens of the default model: 1.41 GiB in
    bfloat16, 2.81 GiB in float32, so 2 and 4 GiB with the 25 % margin. ``shape``: see
    :func:`kv_bytes_per_token`."""
    return math.ceil(tokens * kv_bytes_per_token(dtype, **shape) * margin / GIB)
