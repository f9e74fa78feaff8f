"""``ropeserve``: the gateway's command line. ``ropeserve serve [--flags]`` runs the gateway with uvicorn.

Every setting has a flag (``ropeserve serve --help``; derived from :class:`server.settings.GatewaySettings`),
over the environment (``ROPESERVE_*``) and a config file (``--config``/``ROPESERVE_CONFIG``). With no
``--engine-urls``, ``serve`` first starts the embedded engine (the default model on CPU, dynamic YaRN up to
8 x 8192 tokens) and waits until it is ready, then serves; Ctrl-C or SIGTERM, at any point (also while the
engine is starting), stops the gateway gracefully and then the engine's whole process group::

    ropeserve serve                                   # embedded engine, http://127.0.0.1:8000
    ropeserve serve --engine-urls http://10.0.0.5:8100,http://10.0.0.6:8100 --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.engine_process import EngineProcess, EngineStartError, embedded_engine
from server.settings import GatewaySettings, add_cli_flags, settings_from_cli
from server.upstreams import EnginePool

logger = logging.getLogger("ropeserve")

EngineFactory = Callable[[GatewaySettings], Awaitable[EngineProcess]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropeserve", description="ropeserve: OpenAI-compatible gateway to "
                                     "vLLM engines that extend RoPE context per request.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway (and the embedded engine without engine URLs)",
                                description="Run the gateway. Flags override ROPESERVE_* environment "
                                "variables, which override the config file.")
    add_cli_flags(serve)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)


class StopSignals:
    """SIGINT/SIGTERM set an asyncio event instead of killing the process, so the engine is always stopped.

    Installed with ``signal.signal``: uvicorn replaces them while it serves and restores them afterwards."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self.loop.call_soon_threadsafe(self.event.set)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; whoever runs us there handles them
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it). True when ``work`` finished."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # re-raise its error
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return False


async def serve(settings: GatewaySettings, *, engine_factory: EngineFactory = embedded_engine) -> int:
    """Run the gateway until a signal; in embedded mode, start the engine first and stop it last."""
    engine: EngineProcess | None = None
    with StopSignals(asyncio.get_running_loop()) as signals:
        try:
            if settings.embedded:
                logger.info("no engine URL configured: starting the embedded engine")
                engine = await engine_factory(settings)
                if not await _until_stopped(engine.start(), signals.event):
                    logger.info("stopped while the engine was starting")
                    return 0
            pool = None
            if engine is not None:
                pool = EnginePool.from_settings(settings, urls=[engine.url])
                if settings.tokenizer is None and engine.model_dir is not None:
                    settings = settings.model_copy(update={"tokenizer": str(engine.model_dir)})
            app = create_app(settings, engine_pool=pool)
            config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                    log_level=settings.log_level,
                                    timeout_graceful_shutdown=settings.shutdown_grace_s)
            await uvicorn.Server(config).serve()
        except EngineStartError as exc:
            logger.error("the embedded engine could not start: %s", exc)
            return 1
        finally:
            if engine is not None:
                logger.info("stopping the embedded engine")
                await engine.stop()
    return 0


def _settings_or_exit(args: argparse.Namespace) -> GatewaySettings:
    try:
        return settings_from_cli(args)
    except ValidationError as exc:
        # errors without their input values: an API key must never be printed
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()]
        print("ropeserve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:  # an unreadable config file
        print(f"ropeserve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings_or_exit(args)
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
