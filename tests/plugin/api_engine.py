"""A real vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server``) for the plugin's tests that
need requests one after the other, streaming, ``n``, chat templates or vLLM's own ``/metrics``.

Started in its own process group and stopped with the whole group; ``wait_ready`` polls ``/health``::

    with ApiEngine(model_dir, ["--dtype", "float32", "--hf-overrides", json.dumps(...)]) as engine:
        httpx.post(f"{engine.url}/v1/completions", json={...})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiEngine:
    def __init__(self, model: str, args: list[str], *, env: dict[str, str] | None = None,
                 served_name: str = "model", timeout_s: float = 900) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = served_name
        self.timeout_s = timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ropeserve-api-engine-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> ApiEngine:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the engine exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the engine was not ready within {self.timeout_s} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=60).text

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> ApiEngine:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
