"""The stack the load benchmarks run against by default: the fake vLLM engine as a process
(tests/reliability/engine_server.py: no model, answers paced per token) and a real gateway process
(``python -m server.cli serve``) in front of it, each on a free port, both stopped at the end::

    async with fake_stack(token_delay_s=0.002, sign_answers=True) as stack:
        ... stack.gateway_url, stack.gateway_pid ...

With the fake engine the figures are the gateway's own: its latency overhead, memory and error behaviour
under load, not a model's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.engine_process import EngineProcess, free_port  # noqa: E402

ENGINE_SERVER = str(REPO / "tests" / "reliability" / "engine_server.py")
MODEL = "fake-model"


@dataclasses.dataclass(frozen=True)
class Stack:
    gateway_url: str
    gateway_pid: int
    engine_url: str


@contextlib.asynccontextmanager
async def fake_stack(*, token_delay_s: float = 0.0, sign_answers: bool = False,
                     gateway_args: tuple[str, ...] = ()) -> AsyncIterator[Stack]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("ROPESERVE_")}
    engine_port, gateway_port = free_port(), free_port()
    engine_command = [sys.executable, ENGINE_SERVER, "--port", str(engine_port), "--model", MODEL,
                      "--token-delay-s", str(token_delay_s)]
    if sign_answers:
        engine_command.append("--sign-answers")
    engine = EngineProcess(engine_command, url=f"http://127.0.0.1:{engine_port}", env=env, start_timeout_s=120,
                           poll_interval_s=0.1, stop_timeout_s=5)
    gateway = EngineProcess(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(gateway_port), "--engine-urls", engine.url,
         "--served-model-name", MODEL, "--log-level", "warning", *gateway_args],
        url=f"http://127.0.0.1:{gateway_port}", env=env, start_timeout_s=120, poll_interval_s=0.1,
        health_path="/readyz", stop_timeout_s=40)
    try:
        await engine.start()
        await gateway.start()
        assert gateway.pid is not None
        yield Stack(gateway.url, gateway.pid, engine.url)
    finally:
        await gateway.stop()
        await engine.stop()
