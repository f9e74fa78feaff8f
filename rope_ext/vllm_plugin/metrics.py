"""Prometheus metrics of the plugin, on vLLM's own ``/metrics`` (the API server's default registry).

``ropeserve_engine_rope_factor`` (histogram): the factor chosen for each request at admission.
``ropeserve_engine_rope_bucket_overflow_total`` (counter): requests that grew past their bucket's capacity
``L * s`` and kept their scale (their tokens beyond it extrapolate).
Created lazily and once per process, so importing the plugin registers nothing.
"""

from __future__ import annotations

import functools


@functools.cache
def rope_metrics():
    from prometheus_client import Counter, Histogram

    factor = Histogram(
        "ropeserve_engine_rope_factor",
        "RoPE scale factor chosen per request at admission.",
        buckets=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0),
    )
    overflow = Counter(
        "ropeserve_engine_rope_bucket_overflow",
        "Requests that outgrew their bucket's capacity and kept their scale.",
    )
    return factor, overflow
