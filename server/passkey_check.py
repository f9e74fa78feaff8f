"""The passkey self-check behind ``GET /healthz/passkey?len=N[&depth=D][&seed=S]``.

Builds the paper's passkey prompt of N tokens (within 1 %) with :mod:`server.passkey`, counting tokens with
the served model's tokenizer (:meth:`Generation.count_text`: the gateway's own, or an engine's
``/tokenize``); admits it like any request (same factor policy, same context check); runs it greedily for
:data:`server.passkey.MAX_NEW_TOKENS` tokens through ``/v1/completions``; and scores the first integer of
the answer against the key. One run at a time (a concurrent call gets :class:`~server.errors.PasskeyBusy`,
429 with Retry-After); a result for the same (len, depth, seed) is served again from a short cache,
marked ``"cached": true``::

    checker = PasskeyChecker(generation, metrics, cache_ttl_s=30)
    params = checker.parse(len="4096", depth=None, seed=None)     # InvalidRequest on bad input
    result = await checker.run(params)                            # dict; result["passed"]
"""

from __future__ import annotations

import asyncio
import dataclasses
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
# Room left below the maximum context for the answer (MAX_NEW_TOKENS) and the 1 % tolerance's slack.
HEADROOM = 16
CACHE_ENTRIES = 32
ROUTE = "/healthz/passkey"


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

    @property
    def max_len(self) -> int:
        return self.generation.scaling.max_context - HEADROOM

    def parse(self, *, len: str | None, depth: str | None, seed: str | None) -> PasskeyParams:  # noqa: A002
        """Validated parameters from the raw query strings, or :class:`InvalidRequest` saying what is wrong."""
        bounds = f"[{MIN_LEN}, {self.max_len}]"
        if len is None:
            raise InvalidRequest(f"len is required: the prompt length in tokens, an integer in {bounds}",
                                 param="len")
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

    async def _run(self, params: PasskeyParams) -> dict[str, Any]:
        started = self.clock()
        try:
            prompt = await abuild_passkey_prompt(params.length, self.generation.count_text, seed=params.seed,
                                                 depth=params.depth)
        except PasskeyBuildError as exc:
            raise InvalidRequest(str(exc), param="len") from None
        built = self.clock()
        request = CompletionRequest(prompt=prompt.text, max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        admission, data = await self.generation.complete(ROUTE, request)
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

