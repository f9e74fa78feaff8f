"""Runs ``server.cli.serve`` (the real ``ropeserve serve`` code path: uvicorn, signal handling, the embedded
engine's supervision) with settings given as JSON; in embedded mode (no ``engine_urls``) the engine command
is the fake engine process (engine_server.py) instead of vLLM, restarted with the settings' backoff::

    PYTHONPATH=. python tests/reliability/gateway_harness.py '{"port": 8000, "shutdown_grace_s": 2}' \\
        [--engine-port P --workdir DIR --token-delay-s S]

The embedded engine appends ``PID UNIX_TIME`` to DIR/starts at each start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.cli import configure_logging, serve  # noqa: E402
from server.engine_process import EngineProcess  # noqa: E402
from server.settings import GatewaySettings  # noqa: E402

ENGINE_SERVER = str(Path(__file__).with_name("engine_server.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", help="GatewaySettings as a JSON object")
    parser.add_argument("--engine-port", type=int)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    settings = GatewaySettings(**json.loads(args.settings))

    async def factory(settings: GatewaySettings) -> EngineProcess:
        command = [sys.executable, ENGINE_SERVER, "--port", str(args.engine_port), "--model",
                   settings.served_model_name, "--token-delay-s", str(args.token_delay_s),
                   "--starts-file", str(args.workdir / "starts")]
        return EngineProcess(command, url=f"http://127.0.0.1:{args.engine_port}", poll_interval_s=0.05,
                             stop_timeout_s=5, max_restarts=settings.engine_max_restarts,
                             restart_backoff_s=settings.engine_restart_backoff_s)

    configure_logging(settings.log_level)
    return asyncio.run(serve(settings, engine_factory=factory))


if __name__ == "__main__":
    sys.exit(main())
