"""Run the pending cells of one or more experiments: grouped by engine, one engine start per group.

A cell is one request on one engine plus the row it produces. Cells of any experiment that map to the
same engine configuration share one ``server.offline.run_offline`` call (several, in chunks of about
``chunk_tokens`` prompt tokens, so a long run loses little when interrupted); cells with the same input on
the same engine (``yarn-fit`` at or below L is plain RoPE, as ``unscaled`` is) share one request. Every
request is its own batch and prefix caching is off, so a cell's numbers depend on its request and engine
alone: not on what else ran, nor on which cells a previous, interrupted run finished. Rows are stored as
soon as their engine run returns.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.evals.methods import EngineConfig
from bench.evals.store import CellStore

# Seconds per request on the 2-core test bed (bf16): about 1.46e-3 * n + 3e-8 * n^2 (8k: 14 s, 16k: 32 s).
_COST_LINEAR, _COST_QUADRATIC = 1.46e-3, 3.0e-8


def estimated_seconds(context: int) -> float:
    return _COST_LINEAR * context + _COST_QUADRATIC * context * context


@dataclasses.dataclass(eq=False)
class Cell:
    """One cell: its key columns, the engine and input it needs, how to build the request, how to turn
    the engine's result into the row's value columns."""

    key: Mapping[str, Any]
    engine: EngineConfig
    input_id: tuple
    context: int  # planned length: prompt + max_tokens
    build: Callable[[], Any]  # -> server.offline.Request
    finish: Callable[[Any], Mapping[str, Any]]  # server.offline.Result -> value columns


@dataclasses.dataclass
class EngineRun:
    engine: str
    requests: int
    cells: int
    wall_s: float
    compute_s: float
    error: str | None = None


@dataclasses.dataclass
class RunReport:
    planned: int = 0
    already_done: int = 0
    computed: int = 0
    engine_runs: list[EngineRun] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> list[EngineRun]:
        return [r for r in self.engine_runs if r.error]


def plan_groups(jobs: Sequence[tuple[CellStore, Sequence[Cell]]]
                ) -> dict[EngineConfig, dict[tuple, list[tuple[CellStore, Cell]]]]:
    """Pending cells grouped by engine, then by input (one request per input), in a fixed order."""
    groups: dict[EngineConfig, dict[tuple, list[tuple[CellStore, Cell]]]] = {}
    for store, cells in jobs:
        for cell in cells:
            if not store.done(cell.key):
                groups.setdefault(cell.engine, {}).setdefault(cell.input_id, []).append((store, cell))
    ordered = {}
    for engine in sorted(groups, key=lambda e: e.name):
        inputs = groups[engine]
        ordered[engine] = {i: inputs[i] for i in sorted(inputs, key=lambda i: (inputs[i][0][1].context, repr(i)))}
    return ordered


def shared_rows(jobs: Sequence[tuple[CellStore, Sequence[Cell]]],
                donors: Sequence[tuple[CellStore, Sequence[Cell]]]) -> list[tuple[CellStore, list[dict]]]:
    """For each pending cell of ``jobs``, the row of a stored cell of ``donors`` (the same stores, in the
    same order) that is the same computation: computed on the engine of the pending cell, from the same
    input (a policy at the factor another method's cell ran at, with the same prompt). Each row is the
    stored one under the pending cell's key, with ``shared_from`` naming the method that computed it; the
    caller stores them (:meth:`CellStore.add`), and they are then done like any other."""
    out = []
    for (store, cells), (donor_store, donor_cells) in zip(jobs, donors, strict=True):
        assert store is donor_store, "donors are cells of the same stores"
        computed: dict[tuple[str, tuple], dict[str, str]] = {}
        for cell in donor_cells:
            row = store.get(cell.key)
            if row is not None and row["engine"] == cell.engine.name and not row.get("shared_from"):
                computed.setdefault((cell.engine.name, cell.input_id), row)
        rows = []
        for cell in cells:
            source = computed.get((cell.engine.name, cell.input_id))
            if source is not None and not store.done(cell.key):
                rows.append({**source, **cell.key, "shared_from": source["method"]})
        out.append((store, rows))
    return out


def chunked(items: Sequence[tuple[tuple, list]], chunk_tokens: int) -> list[list[tuple[tuple, list]]]:
    """Consecutive chunks whose planned tokens stay within ``chunk_tokens`` (a chunk holds at least one)."""
    chunks: list[list] = []
    size = 0
    for item in items:
        context = item[1][0][1].context
        if not chunks or size + context > chunk_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += context
    return chunks


class _Progress:
    """A tqdm bar over requests, with a heartbeat showing the running engine and its elapsed time."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.status = ""
        self.started = time.monotonic()
        self._stop = threading.Event()
        if enabled and total:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total, unit="req", dynamic_ncols=True, mininterval=0.5 if tty else 30)
            self._thread = threading.Thread(target=self._beat, args=(1.0 if tty else 60.0,), daemon=True)
            self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self._show()

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.status} ({time.monotonic() - self.started:.0f}s)", refresh=True)

    def engine(self, status: str) -> None:
        self.status, self.started = status, time.monotonic()
        self._show()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()


def run_cells(jobs: Sequence[tuple[CellStore, Sequence[Cell]]], *, model: str, dtype: str, seed: int = 0,
              chunk_tokens: int = 200_000, engine: Callable | None = None, progress: bool = True,
              retries: int = 2, env: Mapping[str, str] | None = None,
              log: Callable[[str], None] | None = None) -> RunReport:
    """Compute every pending cell of ``jobs`` and store its row; returns what ran. A failed engine run is
    retried ``retries`` times (on a busy shared machine engines occasionally die: aborts, a dead engine core); if it
    still fails, it is recorded, its engine's remaining cells stay pending and the other engines run.
    ``env`` is added to every engine's environment (e.g. ``VLLM_CPU_OMP_THREADS_BIND``)."""
    if engine is None:
        from server.offline import run_offline as engine
    log = log or _log_stderr
    report = RunReport(planned=sum(len(cells) for _, cells in jobs))
    report.already_done = sum(1 for store, cells in jobs for c in cells if store.done(c.key))
    groups = plan_groups(jobs)
    bar = _Progress(sum(len(g) for g in groups.values()), progress)
    try:
        for config, inputs in groups.items():
            items = list(inputs.items())
            max_len = max(cells[0][1].context for _, cells in items)
            chunks = chunked(items, chunk_tokens)
            for number, chunk in enumerate(chunks, 1):
                bar.engine(f"{config.name} {number}/{len(chunks)}")
                for attempt in range(retries + 1):
                    run = _run_chunk(config, chunk, model=model, dtype=dtype, seed=seed, max_len=max_len,
                                     engine=engine, env=env or {})
                    report.engine_runs.append(run)
                    if not run.error:
                        break
                    if attempt < retries:
                        log(f"engine {config.name} failed after {run.wall_s:.0f} s; retrying:\n{run.error[-1500:]}")
                bar.update(len(chunk))
                if run.error:
                    log(f"engine {config.name} failed; its remaining cells stay pending:\n{run.error}")
                    break
                report.computed += run.cells
    finally:
        bar.close()
    for store, _ in jobs:
        store.compact()
    return report


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_chunk(config: EngineConfig, chunk, *, model: str, dtype: str, seed: int, max_len: int,
               engine: Callable, env: Mapping[str, str]) -> EngineRun:
    spec = config.spec(model, dtype=dtype, max_len=max_len, seed=seed)
    spec = dataclasses.replace(spec, env={**spec.env, **env})
    requests = [cells[0][1].build() for _, cells in chunk]
    timeout = 3600 + 10 * sum(estimated_seconds(cells[0][1].context) for _, cells in chunk)
    started = time.perf_counter()
    try:
        results = engine(spec, [[r] for r in requests], timeout=timeout)
    except Exception as error:  # noqa: BLE001 - reported, and the other engines still run
        return EngineRun(config.name, len(chunk), 0, time.perf_counter() - started, 0.0,
                         error=f"{type(error).__name__}: {error}"[-4000:])
    wall = time.perf_counter() - started
    by_store: dict[int, tuple[CellStore, list[dict]]] = {}
    cells_done = 0
    for (_, cells), (result,) in zip(chunk, results):
        for store, cell in cells:
            row = {**cell.key, **cell.finish(result), "shared_from": ""}  # computed here
            by_store.setdefault(id(store), (store, []))[1].append(row)
            cells_done += 1
    for store, rows in by_store.values():
        store.add(rows)
    return EngineRun(config.name, len(chunk), cells_done, wall, sum(r[0].seconds for r in results))
