"""Runs ``server.cli.serve`` in embedded mode with a stand-in engine process (tests/server/tiny_engine.py)
instead of vLLM, so the CLI's signal handling and engine shutdown can be tested in a real process::

    PYTHONPATH=. python tests/server/cli_harness.py GATEWAY_PORT ENGINE_PORT WORKDIR [--never-ready]

The engine writes its pid to WORKDIR/starts and its child's pid to WORKDIR/child.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from server.cli import configure_logging, serve
from server.engine_process import EngineProcess
from server.settings import GatewaySettings

TINY = str(Path(__file__).with_name("tiny_engine.py"))


def main() -> int:
    gateway_port, engine_port, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    extra = ["--never-ready"] if "--never-ready" in sys.argv else []
    settings = GatewaySettings(port=gateway_port, served_model_name="fake-model", health_interval_s=0.1)

    async def factory(settings: GatewaySettings) -> EngineProcess:
        command = [sys.executable, TINY, "--port", str(engine_port), "--starts-file", str(workdir / "starts"),
                   "--child-pid-file", str(workdir / "child"), *extra]
        return EngineProcess(command, url=f"http://127.0.0.1:{engine_port}", poll_interval_s=0.05,
                             stop_timeout_s=5)

    configure_logging("info")
    return asyncio.run(serve(settings, engine_factory=factory))


if __name__ == "__main__":
    sys.exit(main())
