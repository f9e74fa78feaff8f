"""The end-to-end fixtures: one gateway with its embedded engine for the whole ``tests/e2e`` package.

Package scope: the engine starts once for every end-to-end module and stops before the plugin tests
start their own engines (the machine has 24 GiB; two idle 64k-context engines next to them would not fit).
"""

from __future__ import annotations

import os

import pytest


E2E_API_KEY = "e2e-test-key"


class RunningGateway:
    """``ropeserve serve`` in embedded mode, in its own process group, for the end-to-end tests."""

    def __init__(self, port: int, engine_port: int) -> None:
        import subprocess
        import sys

        self.url = f"http://127.0.0.1:{port}"
        self.engine_url = f"http://127.0.0.1:{engine_port}"
        self.api_key = E2E_API_KEY
        self.log = open(os.environ.get("ROPESERVE_E2E_LOG", "/tmp/ropeserve-e2e-gateway.log"), "w")  # noqa: SIM115
        env = {**os.environ, "ROPESERVE_API_KEYS": E2E_API_KEY, "ROPESERVE_ENGINE_KVCACHE_GIB": "4"}
        env.pop("ROPESERVE_ENGINE_URLS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-port", str(engine_port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the gateway was not ready within {timeout} s; see {self.log.name}")

    def stop(self) -> int:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="package")
def gateway(model_dir):
    """One gateway with its embedded engine (default model, bf16, dynamic YaRN up to 65536 tokens)."""
    running = RunningGateway(_free_port(), _free_port())
    os.environ["ROPESERVE_API_KEY"] = running.api_key
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()
        os.environ.pop("ROPESERVE_API_KEY", None)


@pytest.fixture(scope="module")
def gateway_url(gateway) -> str:
    return gateway.url
