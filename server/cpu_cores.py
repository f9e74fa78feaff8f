"""Which cores vLLM's CPU worker runs on: every core on a small machine, vLLM's own binding elsewhere.

vLLM's CPU binding (``VLLM_CPU_OMP_THREADS_BIND=auto``) leaves one core per worker to the engine core's
scheduler process on x86. On a 2-core machine that is half of it: measured side by side
(``bench/cpu_speed.py``, docs/RESULTS.md), the worker bound to both cores, sharing them with the scheduler and
the gateway, prefilled 1.9-2.0x and decoded 1.2-1.4x faster through the gateway than with one. So where this
process may use at most :data:`SMALL_MACHINE_CPUS` CPUs (its affinity mask: a container's cpuset counts),
the embedded engine and the compose stack's engine bind the worker to all of them; on a larger machine the
reserved core is a small share and vLLM decides (``auto``); ``VLLM_CPU_OMP_THREADS_BIND`` set by the user
(not empty) always wins::

    extra_env, line = worker_binding(os.environ, allowed_cpus())
    # {"VLLM_CPU_OMP_THREADS_BIND": "0,1"}, "worker cores 0,1: all 2 CPUs of this small machine (...)"
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

BIND = "VLLM_CPU_OMP_THREADS_BIND"
SMALL_MACHINE_CPUS = 4  # measured at 2; up to 4 the core vLLM reserves is a quarter or more of the machine


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), sorted."""
    return sorted(os.sched_getaffinity(0))


def worker_binding(env: Mapping[str, str], cpus: Sequence[int]) -> tuple[dict[str, str], str]:
    """The variables to add to the engine's environment ``env`` on a machine with ``cpus``, and the log
    line saying what was chosen and why."""
    if env.get(BIND):  # empty: unset (docker-compose.yml passes the variable through, empty by default)
        return {}, f"worker cores: {BIND}={env[BIND]} (set explicitly)"
    if len(cpus) > SMALL_MACHINE_CPUS:
        return {BIND: "auto"}, (f"worker cores: vLLM's binding ({BIND}=auto) on {len(cpus)} CPUs, more than "
                                f"{SMALL_MACHINE_CPUS}; set {BIND} to choose")
    bind = ",".join(str(cpu) for cpu in cpus)
    return {BIND: bind}, (f"worker cores {bind}: all {len(cpus)} CPUs of this small machine (vLLM's auto "
                          f"binding would leave one to its scheduler process; set {BIND} to choose)")
