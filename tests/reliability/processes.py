"""Real processes for the fault tests: the fake engine (engine_server.py) and the gateway (gateway_harness.py),
started on free ports, waited for, and always killed at the end (SIGCONT first, in case a test stopped one)::

    with engine_server(token_delay_s=0.05) as engine:       # engine.url, engine.pid (engine_servers(n): n)
        running = engine_running(engine.url)               # the engine's vllm:num_requests_running
    with gateway_process({"engine_urls": [engine.url]}) as gateway:   # gateway.url, gateway.process
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from server.engine_process import free_port
from tests.server.helpers import wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENGINE_SERVER = str(HERE / "engine_server.py")
HARNESS = str(HERE / "gateway_harness.py")
START_TIMEOUT_S = 60  # a process imports torch (through rope_ext) before it listens: seconds on a busy machine


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROPESERVE_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def answers(url: str, path: str) -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def engine_running(url: str) -> int:
    """Requests running on an engine, from its ``/metrics`` (vLLM's ``vllm:num_requests_running``)."""
    text = httpx.get(f"{url}/metrics", timeout=2).text
    match = re.search(r"^vllm:num_requests_running (\d+)", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


@dataclasses.dataclass
class Proc:
    url: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


def _reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.kill()
    process.wait(timeout=10)


@contextlib.contextmanager
def engine_servers(count: int, *, token_delay_s: float = 0.0, sign_answers: bool = False) -> Iterator[list[Proc]]:
    """``count`` fake engine processes, started side by side (each start costs seconds of imports)."""
    procs = []
    try:
        for _ in range(count):
            port = free_port()
            command = [sys.executable, ENGINE_SERVER, "--port", str(port), "--token-delay-s", str(token_delay_s)]
            if sign_answers:
                command.append("--sign-answers")
            procs.append(Proc(f"http://127.0.0.1:{port}", subprocess.Popen(command, env=child_env())))
        for proc in procs:
            wait_until(lambda proc=proc: answers(proc.url, "/health") or proc.process.poll() is not None,
                       timeout=START_TIMEOUT_S)
            assert proc.process.poll() is None, "an engine process exited at start"
        yield procs
    finally:
        for proc in procs:
            _reap(proc.process)


@contextlib.contextmanager
def engine_server(*, token_delay_s: float = 0.0, sign_answers: bool = False) -> Iterator[Proc]:
    with engine_servers(1, token_delay_s=token_delay_s, sign_answers=sign_answers) as (proc,):
        yield proc


@contextlib.contextmanager
def gateway_process(settings: dict[str, Any], *, extra: list[str] = (), ready: bool = True  # type: ignore[assignment]
                    ) -> Iterator[Proc]:
    """``ropeserve serve`` with ``settings`` (port chosen here); waits for /readyz when ``ready``."""
    port = free_port()
    values = {"served_model_name": "fake-model", "port": port, **settings}
    process = subprocess.Popen([sys.executable, HARNESS, json.dumps(values), *extra], env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        path = "/readyz" if ready else "/healthz"
        wait_until(lambda: answers(url, path) or process.poll() is not None, timeout=START_TIMEOUT_S)
        assert process.poll() is None, "the gateway exited at start"
        yield Proc(url, process)
    finally:
        _reap(process)
