"""The plugin's counters, shared between vLLM's processes, and their Prometheus metrics.

The plugin counts in three processes: the engine core admits requests and schedules tokens, the workers
write the rotary offsets of the tokens they compute, and only the API server answers ``/metrics``. Each
process adds to counters in a small file of its own (an ``int64`` memory map) in one directory per
server, ``$ROPESERVE_METRICS_DIR``: the first process of a server (the API server, or the process that
builds ``vllm.LLM``) creates it and its children inherit it. :class:`RopeCollector` sums every file at
scrape time. Counters only grow, so files of processes that have exited keep counting, as Prometheus
counters should.

Exported on vLLM's ``/metrics`` (all labelled by bucket factor where it applies)::

    ropeserve_engine_rope_factor                      histogram: requests by the factor they started at
    ropeserve_engine_rope_grown_total{factor}         requests that moved to a larger bucket, by new factor
    ropeserve_engine_rope_bucket_overflow_total       requests pinned by an override that ran past their bucket
                                                      (none: a pinned request must fit its bucket)
    ropeserve_engine_rope_scheduled_tokens_total{factor}  tokens the scheduler scheduled at each factor
    ropeserve_engine_rope_tokens_total{factor}        tokens whose rotary offsets the workers wrote at each
                                                      factor: the proof that scaling is applied
    ropeserve_engine_rope_tokens_past_capacity_total{factor}  of those, tokens at positions past their bucket's
                                                      capacity L * s: zero unless ``growth="reserve"`` let a
                                                      request without max_tokens run past its bucket

A dynamic model whose scheduler reports scaled tokens but whose workers report none is computing plain
RoPE: the gateway's health check takes such an engine out of rotation (``server/upstreams.py``).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DIR_ENV = "ROPESERVE_METRICS_DIR"
MAX_BUCKETS = 64

# One file kind per counter group; a group holds one slot per bucket (index into the model's buckets).
ADMITTED, GROWN, SCHEDULED, COMPUTED, OVERFLOW, PAST = "admitted", "grown", "scheduled", "computed", "overflow", "past"
KINDS = (ADMITTED, GROWN, SCHEDULED, COMPUTED, OVERFLOW, PAST)


def metrics_dir(create: bool = True) -> Path | None:
    """This server's counter directory; created (and removed at exit) by the first process that asks."""
    path = os.environ.get(DIR_ENV)
    if path:
        return Path(path)
    if not create:
        return None
    path = tempfile.mkdtemp(prefix="ropeserve-metrics-")
    os.environ[DIR_ENV] = path
    atexit.register(shutil.rmtree, path, True)
    return Path(path)


class Counters:
    """This process's counters of one kind: ``MAX_BUCKETS`` int64 slots in a file of its own."""

    def __init__(self, kind: str, directory: Path | None = None) -> None:
        directory = directory or metrics_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{kind}.{os.getpid()}.i64"
        self.values = np.memmap(self.path, dtype=np.int64, mode="w+" if not self.path.exists() else "r+",
                                shape=(MAX_BUCKETS,))

    def add(self, index: int, n: int = 1) -> None:
        self.values[index] += n

    def add_all(self, counts: np.ndarray) -> None:
        """Add a whole vector (one entry per bucket)."""
        self.values[: counts.shape[0]] += counts


def counters(kind: str) -> Counters:
    """This process's counters of ``kind`` in this server's directory (created on first use)."""
    return _counters(kind, metrics_dir())


@functools.cache
def _counters(kind: str, directory: Path) -> Counters:
    return Counters(kind, directory)


def write_buckets(buckets: Sequence[float]) -> None:
    """Record the model's buckets (the labels of the slots) for the collector; the engine core calls it."""
    path = metrics_dir() / "buckets.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([float(b) for b in buckets]))
    os.replace(tmp, path)


def read_buckets(directory: Path | None = None) -> tuple[float, ...] | None:
    directory = directory if directory is not None else metrics_dir(create=False)
    try:
        return tuple(json.loads((directory / "buckets.json").read_text()))
    except (OSError, TypeError, ValueError):
        return None


def read_counters(directory: Path | str | None = None) -> dict[str, np.ndarray]:
    """Every kind summed over the files of every process: ``{kind: int64[MAX_BUCKETS]}``."""
    directory = Path(directory) if directory is not None else metrics_dir(create=False)
    totals = {kind: np.zeros(MAX_BUCKETS, dtype=np.int64) for kind in KINDS}
    if directory is None or not directory.is_dir():
        return totals
    for path in directory.glob("*.i64"):
        kind = path.name.split(".", 1)[0]
        if kind in totals and path.stat().st_size == MAX_BUCKETS * 8:
            totals[kind] += np.fromfile(path, dtype=np.int64)
    return totals


class RopeCollector:
    """A Prometheus collector of the shared counters, for the API server's registry. It reports nothing
    until an engine core of a dynamic model has recorded its buckets."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        buckets = read_buckets(self.directory)
        if not buckets:
            return
        totals = read_counters(self.directory)
        n = len(buckets)
        labels = [f"{b:g}" for b in buckets]
        admitted = totals[ADMITTED][:n]
        cumulative = np.cumsum(admitted)
        yield HistogramMetricFamily(
            "ropeserve_engine_rope_factor", "RoPE scale factor each request started at.",
            buckets=[*[(f"{b}", float(c)) for b, c in zip(buckets, cumulative)], ("+Inf", float(cumulative[-1]))],
            sum_value=float(np.dot(admitted, buckets)))
        for kind, name, help_text in (
                (GROWN, "ropeserve_engine_rope_grown", "Requests that moved to a larger bucket, by new factor."),
                (SCHEDULED, "ropeserve_engine_rope_scheduled_tokens", "Tokens scheduled at each factor."),
                (COMPUTED, "ropeserve_engine_rope_tokens",
                 "Tokens whose rotary offsets the workers wrote at each factor."),
                (PAST, "ropeserve_engine_rope_tokens_past_capacity",
                 "Tokens computed at positions past their bucket's capacity (growth=reserve, no max_tokens).")):
            family = CounterMetricFamily(name, help_text, labels=["factor"])
            for label, value in zip(labels, totals[kind][:n]):
                family.add_metric([label], float(value))
            yield family
        overflow = CounterMetricFamily("ropeserve_engine_rope_bucket_overflow",
                                       "Requests pinned by an override that ran past their bucket's capacity.")
        overflow.add_metric([], float(totals[OVERFLOW][0]))
        yield overflow


_collector_registered = False


def register_collector() -> None:
    """Expose this server's counters on the default Prometheus registry (vLLM's ``/metrics``), once."""
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(RopeCollector(metrics_dir()))
    _collector_registered = True
