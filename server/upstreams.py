"""The engine pool: which vLLM engine serves the next request, and which engines are healthy.

Each engine has one ``httpx.AsyncClient``. A request goes to the healthy engine with the fewest requests in
flight (ties: the one picked least recently). A background loop calls ``GET /health`` on every engine each
``health_interval_s``; after ``eject_after_failures`` failures in a row an engine is taken out, and a
refused connection while forwarding takes it out at once (the request then tries the next engine: it never
reached the refused one). One passing check puts it back, once its ``/v1/models`` confirms it serves the
gateway's model at the gateway's maximum context, so gateway and engine agree on the context.

A check also reads the engine's ``/metrics`` for the rope plugin's evidence (:func:`rope_evidence`) when the
engine joins and then every ``evidence_interval_s`` (30 s: the evidence moves slowly, and scraping vLLM's
/metrics every 2 s cost a fifth of the gateway's decode throughput at 16 running requests on a 2-core
machine, ``bench/cpu_speed.py``): an engine without the plugin's metrics is misconfigured (it would serve
every request with plain RoPE), and one whose scheduler reports tokens at scaled factors while its workers
report none computed fails the check (the plugin's hook is not applied), so it leaves rotation like an
engine that fails ``/health``::

    pool = EnginePool.from_settings(settings)
    await pool.start()
    lease, response = await pool.send(lambda engine: engine.client.build_request("POST", "/v1/completions", json=body))
    try: ...
    finally: lease.release()
    await pool.close()

``transports`` (URL -> httpx transport) lets tests put in-process fake engines behind the URLs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.errors import EngineConnectionLost, EngineError, EngineTimeout, NoEngineAvailable
from server.settings import GatewaySettings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Engine:
    """One upstream engine and what the pool knows about it."""

    url: str
    client: httpx.AsyncClient
    state: str = "unknown"  # unknown | healthy | unhealthy | misconfigured
    in_flight: int = 0
    failures: int = 0
    last_error: str | None = "not checked yet"
    last_check: float | None = None
    last_evidence: float | None = None  # when the check last read the rope plugin's evidence
    last_pick: int = 0

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "healthy": self.healthy, "in_flight": self.in_flight,
                "consecutive_failures": self.failures, "last_error": self.last_error,
                "last_check_unix": self.last_check}


class Lease:
    """One request's claim on an engine; ``release()`` (idempotent) ends it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.released = False
        engine.in_flight += 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine.in_flight -= 1


class EnginePool:
    def __init__(self, urls: list[str], *, model: str, max_model_len: int, health_interval_s: float = 2.0,
                 evidence_interval_s: float = 30.0, health_timeout_s: float = 2.0, eject_after_failures: int = 2,
                 timeout: httpx.Timeout | None = None,
                 transports: Mapping[str, httpx.AsyncBaseTransport] | None = None) -> None:
        if not urls:
            raise ValueError("an engine pool needs at least one engine URL")
        transports = transports or {}
        self.model = model
        self.max_model_len = max_model_len
        self.health_interval_s = health_interval_s
        self.evidence_interval_s = evidence_interval_s
        self.health_timeout_s = health_timeout_s
        self.eject_after_failures = eject_after_failures
        timeout = timeout or httpx.Timeout(600.0, connect=5.0)
        self.engines = [
            Engine(url, httpx.AsyncClient(base_url=url, timeout=timeout, transport=transports.get(url)))
            for url in urls
        ]
        self._picks = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: GatewaySettings, *, urls: list[str] | None = None,
                      transports: Mapping[str, httpx.AsyncBaseTransport] | None = None) -> EnginePool:
        return cls(
            urls or settings.engine_urls,
            model=settings.served_model_name,
            max_model_len=settings.rope_scaling().max_context,
            health_interval_s=settings.health_interval_s,
            evidence_interval_s=settings.evidence_interval_s,
            health_timeout_s=settings.health_timeout_s,
            eject_after_failures=settings.eject_after_failures,
            timeout=httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s),
            transports=transports,
        )

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every engine once, then keep checking in the background."""
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="engine-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.gather(*(engine.client.aclose() for engine in self.engines))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    # --- health ----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(engine.healthy for engine in self.engines)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(engine) for engine in self.engines))

    async def check(self, engine: Engine) -> bool:
        """One health check: ``GET /health``, plus ``GET /v1/models`` when the engine (re)joins, and its rope
        evidence (``GET /metrics``) when it (re)joins or the last reading is ``evidence_interval_s`` old."""
        now = engine.last_check = time.time()
        try:
            response = await engine.client.get("/health", timeout=self.health_timeout_s)
            if response.status_code != 200:
                raise _CheckFailed(f"GET /health answered {response.status_code}")
            if not engine.healthy:
                await self._verify_model(engine)
            if not engine.healthy or engine.last_evidence is None or now - engine.last_evidence >= self.evidence_interval_s:
                await self._verify_rope(engine)
                engine.last_evidence = now
        except _Misconfigured as exc:
            if engine.state != "misconfigured":
                logger.error("engine %s is misconfigured and stays out of rotation: %s", engine.url, exc)
            engine.state, engine.last_error = "misconfigured", str(exc)
            return False
        except (_CheckFailed, httpx.HTTPError) as exc:
            self._failed(engine, _describe(exc))
            return False
        if not engine.healthy:
            logger.info("engine %s is healthy and in rotation", engine.url)
        engine.state, engine.failures, engine.last_error = "healthy", 0, None
        return True

    async def _verify_model(self, engine: Engine) -> None:
        response = await engine.client.get("/v1/models", timeout=self.health_timeout_s)
        if response.status_code != 200:
            raise _CheckFailed(f"GET /v1/models answered {response.status_code}")
        try:
            cards = {card["id"]: card for card in response.json()["data"]}
        except (ValueError, KeyError, TypeError):
            raise _CheckFailed("GET /v1/models returned an unexpected body") from None
        card = cards.get(self.model)
        if card is None:
            raise _Misconfigured(f"it does not serve model {self.model!r} (it serves {sorted(cards)})")
        if card.get("max_model_len") != self.max_model_len:
            raise _Misconfigured(f"its max_model_len is {card.get('max_model_len')}, the gateway's RoPE "
                                 f"settings give {self.max_model_len}")

    async def _verify_rope(self, engine: Engine) -> None:
        response = await engine.client.get("/metrics", timeout=self.health_timeout_s)
        if response.status_code != 200:
            raise _CheckFailed(f"GET /metrics answered {response.status_code}")
        evidence = rope_evidence(response.text)
        if evidence is None:
            raise _Misconfigured("it exports no ropeserve_engine_rope_* metrics: the rope plugin is not installed "
                                 "or not active there, so every request would run with plain RoPE")
        scheduled, computed = evidence
        if scheduled > 0 and computed == 0:
            raise _CheckFailed(f"it scheduled {scheduled} tokens at scaled RoPE factors but computed none at "
                               "them: the rope plugin's hook is not applied")

    def _failed(self, engine: Engine, reason: str) -> None:
        engine.failures += 1
        engine.last_error = reason
        if engine.state == "healthy" and engine.failures < self.eject_after_failures:
            return
        if engine.state == "healthy":
            logger.warning("engine %s taken out of rotation after %d failed checks: %s",
                           engine.url, engine.failures, reason)
        engine.state = "unhealthy"

    def eject(self, engine: Engine, reason: str) -> None:
        """Take an engine out at once (its connection was refused); the health loop puts it back."""
        if engine.healthy:
            logger.warning("engine %s taken out of rotation: %s", engine.url, reason)
        engine.state, engine.last_error = "unhealthy", reason
        engine.failures = max(engine.failures, self.eject_after_failures)

    # --- routing ---------------------------------------------------------------------------------------

    def lease(self, *, exclude: tuple[Engine, ...] = (), rotate: bool = True) -> Lease:
        """Claim the healthy engine with the fewest requests in flight (ties: the least recently picked).

        ``rotate=False`` (small calls such as /tokenize) leaves the round-robin order alone: otherwise a
        request's tokenize and generate calls would alternate over two engines and every generation
        would land on the same one."""
        candidates = [e for e in self.engines if e.healthy and e not in exclude]
        if not candidates:
            if exclude:
                raise NoEngineAvailable(
                    f"no engine reachable: connection refused by {', '.join(e.url for e in exclude)}")
            states = ", ".join(f"{e.url} ({e.state}: {e.last_error})" for e in self.engines)
            raise NoEngineAvailable(f"no engine is ready to serve requests: {states}")
        engine = min(candidates, key=lambda e: (e.in_flight, e.last_pick))
        if rotate:
            self._picks += 1
            engine.last_pick = self._picks
        return Lease(engine)

    async def send(self, build: Callable[[Engine], httpx.Request], *, stream: bool = False,
                   rotate: bool = True) -> tuple[Lease, httpx.Response]:
        """Send a request to the best engine; on a refused connection, eject it and try the next one.

        The caller owns the returned lease (and, when ``stream``, the open response) and must release
        (and close) them."""
        tried: tuple[Engine, ...] = ()
        while True:
            lease = self.lease(exclude=tried, rotate=rotate)
            engine = lease.engine
            try:
                response = await engine.client.send(build(engine), stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                lease.release()
                self.eject(engine, _describe(exc))
                tried += (engine,)
                continue
            except httpx.TimeoutException:
                lease.release()
                raise EngineTimeout(f"the engine did not answer within the request timeout ({engine.url})") \
                    from None
            except httpx.TransportError as exc:  # the request may have reached it: no retry; the health
                lease.release()                    # checks decide whether the engine itself is down
                raise EngineConnectionLost(f"lost the connection to the engine: {_describe(exc)}") from None
            except BaseException:
                lease.release()
                raise
            return lease, response

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A small JSON call (e.g. ``/tokenize``) to the best engine; engine errors raise :class:`EngineError`."""
        lease, response = await self.send(lambda engine: engine.client.build_request("POST", path, json=body),
                                          rotate=False)
        lease.release()
        if response.status_code >= 400:
            raise EngineError(response.status_code, response.content)
        return response.json()

    def status(self) -> list[dict[str, Any]]:
        return [engine.status() for engine in self.engines]


def _rope_samples(metrics_text: str):
    lines = "\n".join(line for line in metrics_text.splitlines()
                      if line.startswith(("ropeserve_engine_rope_tokens", "ropeserve_engine_rope_scheduled_tokens",
                                          "# TYPE ropeserve_engine_rope_")))
    for family in text_string_to_metric_families(lines):
        yield from family.samples


def rope_evidence_totals(metrics_text: str) -> int | None:
    """Tokens an engine computed at every factor (``ropeserve_engine_rope_tokens_total``), or None."""
    values = [s.value for s in _rope_samples(metrics_text) if s.name == "ropeserve_engine_rope_tokens_total"]
    return int(sum(values)) if values else None


def rope_evidence(metrics_text: str) -> tuple[int, int] | None:
    """Tokens an engine scheduled and computed at factors above 1, from its ``/metrics``, or None when it
    exports neither counter (no rope plugin)."""
    totals: dict[str, float] = {}
    for sample in _rope_samples(metrics_text):
        if sample.name.endswith("_total") and sample.labels.get("factor") not in (None, "1"):
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        elif sample.name.endswith("_total"):
            totals.setdefault(sample.name, 0.0)
    names = ("ropeserve_engine_rope_scheduled_tokens_total", "ropeserve_engine_rope_tokens_total")
    if not all(name in totals for name in names):
        return None
    return int(totals[names[0]]), int(totals[names[1]])


class _CheckFailed(Exception):
    pass


class _Misconfigured(Exception):
    pass


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
