"""The passkey self-check behind ``GET /healthz/passkey?len=N[&depth=D][&seed=S]``.

``len`` is the request's whole context in tokens, as the benchmarks count a cell's length: the paper's
passkey prompt (:mod:`server.passkey`) of ``N - 10`` tokens (exactly, or up to 1 % fewer, never more) plus
the :data:`server.passkey.MAX_NEW_TOKENS` = 10 tokens of the answer, so every ``N`` up to the served
maximum context fits (``len=65536`` on the default set-up). Tokens are counted with the served model's
tokenizer (:meth:`Generation.count_text`: the gateway's own, or an engine's ``/tokenize``); the request is
admitted like any other (same factor policy, same context check), run greedily through
``/v1/completions`` without the generic request timeout (a 64k check takes about half an hour on CPU),
and the first integer of the answer is scored against the key. One run at a time (a concurrent call gets
:class:`~server.errors.PasskeyBusy`, 429 with Retry-After); a result for the same (len, depth, seed) is
served again from a short cache, marked ``"cached": true``.

While a check runs, :class:`Progress` reads the engines' ``ropeserve_engine_rope_tokens_total`` (the
tokens they computed) every few seconds: the gateway logs how far the prefill is, at what rate, and the
time left at that rate, and ``GET /healthz/passkey/progress`` returns the same (the client CLI shows it).
Other traffic on the same engines counts too, so under load the progress reads ahead::

    checker = PasskeyChecker(generation, metrics, cache_ttl_s=30)
    params = checker.parse(len="4096", depth=None, seed=None)     # InvalidRequest on bad input
    result = await checker.run(params)                            # dict; result["passed"]
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from server.errors import GatewayError, InvalidRequest, PasskeyBusy, envelope
from server.generation import Generation
from server.metrics import GatewayMetrics
from server.passkey import MAX_NEW_TOKENS, PasskeyBuildError, abuild_passkey_prompt, parse_answer
from server.schemas import CompletionRequest

MIN_LEN = 64
logger = logging.getLogger(__name__)
CACHE_ENTRIES = 32
ROUTE = "/healthz/passkey"
PROGRESS_ROUTE = "/healthz/passkey/progress"
PROGRESS_INTERVAL_S = 5.0
LOG_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class PasskeyParams:
    length: int
    depth: float | None
    seed: int


class PasskeyChecker:
    def __init__(self, generation: Generation, metrics: GatewayMetrics, *, cache_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.generation = generation
        self.metrics = metrics
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[PasskeyParams, tuple[float, dict[str, Any]]] = OrderedDict()
        self._run_started: float | None = None
        self._last_duration: float | None = None
        self._progress: Progress | None = None

    @property
    def max_len(self) -> int:
        return self.generation.scaling.max_context

    def parse(self, *, len: str | None, depth: str | None, seed: str | None) -> PasskeyParams:  # noqa: A002
        """Validated parameters from the raw query strings, or :class:`InvalidRequest` saying what is wrong."""
        bounds = f"[{MIN_LEN}, {self.max_len}]"
        if len is None:
            raise InvalidRequest(f"len is required: the request's context in tokens (the prompt and the "
                                 f"{MAX_NEW_TOKENS}-token answer), an integer in {bounds}", param="len")
        try:
            length = int(len)
        except ValueError:
            raise InvalidRequest(f"len must be an integer in {bounds} (got {len!r})", param="len") from None
        if not MIN_LEN <= length <= self.max_len:
            raise InvalidRequest(f"len must be in {bounds}: the maximum context is "
                                 f"{self.generation.scaling.max_context} tokens (got {length})", param="len")
        parsed_depth = None
        if depth is not None:
            try:
                parsed_depth = float(depth)
            except ValueError:
                parsed_depth = math.nan
            if not 0 <= parsed_depth <= 1:
                raise InvalidRequest(f"depth must be a number in [0, 1] (got {depth!r})", param="depth")
        parsed_seed = 0
        if seed is not None:
            try:
                parsed_seed = int(seed)
            except ValueError:
                raise InvalidRequest(f"seed must be an integer (got {seed!r})", param="seed") from None
        return PasskeyParams(length, parsed_depth, parsed_seed)

    def _cached(self, params: PasskeyParams) -> dict[str, Any] | None:
        entry = self._cache.get(params)
        if entry is None:
            return None
        stored, result = entry
        age = self.clock() - stored
        if age > self.cache_ttl_s:
            del self._cache[params]
            return None
        return {**result, "cached": True, "cache_age_s": round(age, 3)}

    def _store(self, params: PasskeyParams, result: dict[str, Any]) -> None:
        if self.cache_ttl_s <= 0:
            return
        self._cache[params] = (self.clock(), result)
        self._cache.move_to_end(params)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def retry_after(self) -> int:
        """Seconds until the running check should be done: the last run's duration minus this run's age."""
        if self._run_started is None or self._last_duration is None:
            return 5
        return max(1, math.ceil(self._last_duration - (self.clock() - self._run_started)))

    async def run(self, params: PasskeyParams) -> dict[str, Any]:
        cached = self._cached(params)
        if cached is not None:
            return cached
        if self._lock.locked():
            raise PasskeyBusy(f"a passkey check is already running; retry in {self.retry_after()} s",
                              retry_after=self.retry_after())
        async with self._lock:
            self._run_started = self.clock()
            try:
                result = await self._run(params)
            except GatewayError:
                self.metrics.passkey_runs.labels("error").inc()
                raise
            finally:
                self._last_duration = self.clock() - self._run_started
        self._store(params, result)
        return result

    def progress(self) -> dict[str, Any]:
        """The running check's progress (``GET /healthz/passkey/progress``), or that none runs."""
        if self._progress is None:
            return {"running": False, "last_duration_s": None if self._last_duration is None
                    else round(self._last_duration, 3)}
        return {"running": True, **self._progress.snapshot()}

    async def _run(self, params: PasskeyParams) -> dict[str, Any]:
        started = self.clock()
        try:
            prompt = await abuild_passkey_prompt(params.length - MAX_NEW_TOKENS, self.generation.count_text,
                                                 seed=params.seed, depth=params.depth, at_most=True)
        except PasskeyBuildError as exc:
            raise InvalidRequest(str(exc), param="len") from None
        built = self.clock()
        request = CompletionRequest(prompt=prompt.text, max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        self._progress = Progress(self.generation.pool, params.length, prompt.tokens, self.clock)
        watcher = asyncio.create_task(self._progress.watch())
        try:
            admission, data = await self.generation.complete(ROUTE, request, timeout=None)
        finally:
            watcher.cancel()
            self._progress = None
        finished = self.clock()
        choices = data.get("choices") or [{}]
        answer = choices[0].get("text") or ""
        answer_key = parse_answer(answer)
        passed = answer_key == prompt.key
        latency = finished - built
        result: dict[str, Any] = {
            "passed": passed,
            "requested_tokens": params.length,
            "prompt_tokens": admission.prompt_tokens,
            "depth": round(prompt.depth, 6),
            "seed": params.seed,
            "expected_key": prompt.key,
            "answer": answer,
            "answer_key": answer_key,
            "rope_factor": admission.factor,
            "max_new_tokens": MAX_NEW_TOKENS,
            "model": self.generation.model,
            "latency_s": round(latency, 4),
            "build_s": round(built - started, 4),
            "total_s": round(finished - started, 4),
            "cached": False,
        }
        if not passed:
            result["error"] = envelope(
                f"passkey not retrieved: expected {prompt.key}, the model answered {answer!r}",
                "server_error", code="passkey_failed")["error"]
        self.metrics.passkey_runs.labels("passed" if passed else "failed").inc()
        self.metrics.passkey_last_passed.set(1 if passed else 0)
        self.metrics.passkey_last_prompt_tokens.set(admission.prompt_tokens)
        self.metrics.passkey_last_factor.set(admission.factor)
        self.metrics.passkey_last_latency.set(latency)
        self.metrics.passkey_last_time.set(time.time())
        return result



class Progress:
    """How far a running check's prefill is, from the engines' computed-token counters."""

    def __init__(self, pool, length: int, prompt_tokens: int, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.length = length
        self.prompt_tokens = prompt_tokens
        self.clock = clock
        self.started = clock()
        self.base: int | None = None
        self.computed = 0

    async def _computed_total(self) -> int | None:
        from server.upstreams import rope_evidence_totals

        totals = []
        for engine in self.pool.engines:
            try:
                response = await engine.client.get("/metrics", timeout=self.pool.health_timeout_s)
            except Exception:  # noqa: BLE001 - progress is best effort; the check itself reports failures
                continue
            if response.status_code == 200 and (total := rope_evidence_totals(response.text)) is not None:
                totals.append(total)
        return sum(totals) if totals else None

    async def watch(self, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.base = await self._computed_total()
        last_log = self.started
        while True:
            await asyncio.sleep(interval_s)
            total = await self._computed_total()
            if total is not None and self.base is not None:
                self.computed = min(self.prompt_tokens, total - self.base)
            if self.clock() - last_log >= LOG_EVERY_S:
                last_log = self.clock()
                snap = self.snapshot()
                eta = "unknown" if snap["eta_s"] is None else f"about {snap['eta_s']:.0f} s"
                logger.info("passkey len=%d: %d of %d prompt tokens computed (%.0f %%), %.0f s elapsed, %s left",
                            self.length, snap["computed_tokens"], self.prompt_tokens,
                            100 * snap["computed_tokens"] / self.prompt_tokens, snap["elapsed_s"], eta)

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.clock() - self.started
        rate = self.computed / elapsed if elapsed > 0 and self.computed else None
        eta = None if rate is None else (self.prompt_tokens - self.computed) / rate
        return {"len": self.length, "prompt_tokens": self.prompt_tokens, "computed_tokens": self.computed,
                "elapsed_s": round(elapsed, 1), "tokens_per_s": None if rate is None else round(rate, 1),
                "eta_s": None if eta is None else round(eta, 1)}
