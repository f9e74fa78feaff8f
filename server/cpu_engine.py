"""The compose stack's CPU engine: vLLM's OpenAI server, in the dtype and on the cores this CPU runs fastest.

Takes vLLM's ``api_server`` arguments; ``--dtype auto`` (or no ``--dtype``) becomes bfloat16 where the CPU
has native bfloat16 instructions and float32 elsewhere (:mod:`server.cpu_dtype`, the rule of the embedded
engine), any other ``--dtype`` is passed on; the worker's cores follow :mod:`server.cpu_cores` (every core of
a small machine, unless ``VLLM_CPU_OMP_THREADS_BIND`` is set). It logs both choices and why, then replaces
itself with vLLM (same process, so the container's signals reach vLLM)::

    python -m server.cpu_engine --model DIR --port 8001 ... --dtype=auto

docker-compose.yml passes ``--dtype=${ROPESERVE_ENGINE_DTYPE:-auto}``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

from server.cpu_cores import allowed_cpus, worker_binding
from server.cpu_dtype import AUTO, read_cpu_flags, resolve_dtype

logger = logging.getLogger("ropeserve.cpu_engine")

API_SERVER = "vllm.entrypoints.openai.api_server"
OVERRIDE = "ROPESERVE_ENGINE_DTYPE"


def split_dtype(args: list[str]) -> tuple[str, list[str]]:
    """``(the --dtype value or "auto", the other arguments)``; ``--dtype X`` and ``--dtype=X`` both count,
    the last one given wins (as in argparse)."""
    requested, rest = AUTO, []
    words = iter(args)
    for word in words:
        if word == "--dtype":
            requested = next(words, AUTO)
        elif word.startswith("--dtype="):
            requested = word.split("=", 1)[1]
        else:
            rest.append(word)
    return requested, rest


def vllm_command(args: list[str], flags: Iterable[str]) -> tuple[list[str], str]:
    """vLLM's command line for ``args`` with the dtype resolved from ``flags``, and the log line why."""
    requested, rest = split_dtype(args)
    dtype, why = resolve_dtype(requested, flags, override=OVERRIDE)
    return [sys.executable, "-m", API_SERVER, *rest, "--dtype", dtype], why


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command, why = vllm_command(sys.argv[1:] if argv is None else argv, read_cpu_flags())
    logger.info(why)
    cores, line = worker_binding(os.environ, allowed_cpus())
    logger.info(line)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, **cores})


if __name__ == "__main__":
    main()
