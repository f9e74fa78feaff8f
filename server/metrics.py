"""Prometheus metrics of one gateway app, in its own ``CollectorRegistry`` (never the global one).

Requests by route and status with latency histograms (recorded by the ASGI middleware in
``server/middleware.py``), prompt and generated tokens, the RoPE factor chosen per request, passkey runs and
their last result, and the state of each engine (read from the pool at scrape time, so it is never stale)::

    metrics = GatewayMetrics(scaling.buckets)
    metrics.watch(pool)
    metrics.rope_factor.observe(2.0)
    body = metrics.render()          # text exposition format for GET /metrics
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.upstreams import EnginePool

NAMESPACE = "ropeserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    """Engine health and load, read from the pool on every scrape."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(f"{NAMESPACE}_engine_healthy", "1 when the engine is in rotation.",
                                    labels=["engine"])
        in_flight = GaugeMetricFamily(f"{NAMESPACE}_engine_in_flight", "Requests in flight on the engine.",
                                      labels=["engine"])
        failures = GaugeMetricFamily(f"{NAMESPACE}_engine_consecutive_failures",
                                     "Consecutive failed health checks of the engine.", labels=["engine"])
        for engine in self.pool.engines:
            healthy.add_metric([engine.url], 1.0 if engine.healthy else 0.0)
            in_flight.add_metric([engine.url], engine.in_flight)
            failures.add_metric([engine.url], engine.failures)
        ready = GaugeMetricFamily(f"{NAMESPACE}_ready", "1 when at least one engine is in rotation.")
        ready.add_metric([], 1.0 if self.pool.ready else 0.0)
        yield from (healthy, in_flight, failures, ready)


class GatewayMetrics:
    def __init__(self, factor_buckets: Iterable[float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{NAMESPACE}_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram(f"{NAMESPACE}_request_duration_seconds",
                                 "Time from request to the last byte of the response, by route.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{NAMESPACE}_prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["route"], registry=r)
        self.generated_tokens = Counter(
            f"{NAMESPACE}_generated_tokens", "Generated tokens reported by the engines' usage (streams: when "
            "stream_options.include_usage is set).", ["route"], registry=r)
        buckets = tuple(sorted(set(factor_buckets)))
        self.rope_factor = Histogram(f"{NAMESPACE}_rope_factor", "RoPE scale factor each request starts at.",
                                     buckets=buckets, registry=r)
        self.rope_factor_final = Histogram(
            f"{NAMESPACE}_rope_factor_final", "RoPE scale factor each finished request ended at (it grows past "
            "the bucket boundaries it crosses); known from its usage.", buckets=buckets, registry=r)
        self.rejected = Counter(f"{NAMESPACE}_admission_rejections",
                                "Requests refused before any engine (context exceeded, invalid RoPE override).",
                                registry=r)
        self.passkey_runs = Counter(f"{NAMESPACE}_passkey_runs", "Passkey self-checks run, by result "
                                    "(passed, failed, error).", ["result"], registry=r)
        self.passkey_last_passed = Gauge(f"{NAMESPACE}_passkey_last_passed",
                                         "1 when the last passkey self-check retrieved the key, else 0.",
                                         registry=r)
        self.passkey_last_prompt_tokens = Gauge(f"{NAMESPACE}_passkey_last_prompt_tokens",
                                                "Prompt tokens of the last passkey self-check.", registry=r)
        self.passkey_last_factor = Gauge(f"{NAMESPACE}_passkey_last_rope_factor",
                                         "RoPE factor of the last passkey self-check.", registry=r)
        self.passkey_last_latency = Gauge(f"{NAMESPACE}_passkey_last_latency_seconds",
                                          "Generation latency of the last passkey self-check.", registry=r)
        self.passkey_last_time = Gauge(f"{NAMESPACE}_passkey_last_run_timestamp_seconds",
                                       "Unix time of the last passkey self-check.", registry=r)
        self._engines: _EngineCollector | None = None

    def watch(self, pool: EnginePool) -> None:
        """Export the state of ``pool``'s engines (replacing a pool watched before)."""
        if self._engines is not None:
            self.registry.unregister(self._engines)
        self._engines = _EngineCollector(pool)
        self.registry.register(self._engines)

    def render(self) -> bytes:
        return generate_latest(self.registry)
