"""Admission: each request's starting scale and prefix-cache salt, fixed where every request enters the
engine core.

``EngineCore.preprocess_add_request`` turns every ``EngineCoreRequest`` into the scheduler's ``Request``
(from the OpenAI front-end, ``vllm.LLM``, another front-end, or a client of the engine core itself), and
the ``Request`` hashes its prefix-cache blocks as it is built. We wrap it: :func:`admit` asks
:func:`rope_ext.choose_factor` for the request's factor (from its prompt length, its ``max_tokens`` and an
optional override ``vllm_xargs={"rope_factor": s}``) and salts its cache, before the blocks are hashed.
The factor is recorded in the request (``request.ropeserve``, a :class:`RopeState`, and
``sampling_params.extra_args["rope_factor"]``); from there the scheduler (:mod:`.scheduler`) grows it and
tells the workers every request's factor. Nothing else decides a factor.

``max_tokens``: vLLM fills a missing ``max_tokens`` with the remaining context before the engine core sees
it, so a ``max_tokens`` that reaches ``max_model_len`` is read as "not set" (``policy.requested_max_tokens``,
as the gateway reads it; under ``growth="reserve"`` the generation reserve is then used; the growth modes
read the prompt alone).

Prefix caching: vLLM's block hash covers tokens, LoRA, multimodal inputs and ``cache_salt``, not RoPE.
Keys cached at one scale are wrong at another, so a request at a factor other than 1 gets its factor
appended to its ``cache_salt``: blocks are shared only between requests at the same scale, and factor-1
requests share blocks with each other exactly as stock vLLM does. A request that grows is re-salted for
its new scale (:func:`salt_for`); under ``growth="rerotate"`` a request that may grow gets a salt of its
own instead (its blocks are rotated in place, so they must never be shared). A front-end may send a
prompt's block hashes precomputed (vLLM 0.34's ``EngineCoreRequest.block_hashes``), under the salt it knew:
a request whose salt admission changes has them dropped, and the engine core hashes it under the new salt.

Streaming-input sessions (``resumable`` requests) are admitted once, by their first chunk; later chunks
keep the session's scale (and grow it like any request).

A request pinned by an override never grows, so it must fit its bucket (rule 5 of :mod:`rope_ext.policy`,
:func:`fit_to_bucket`): prompt plus ``max_tokens`` over the bucket's capacity is refused, and a request
without ``max_tokens`` (vLLM's fill-in, read as unset) has its ``max_tokens`` capped at ``capacity -
prompt``, so it finishes with reason ``length`` at the capacity.

The front-end's job (:func:`patch_input_processor`), before the request reaches the engine core, with the
engine core's own rules: an invalid override, and a pinned request that does not fit its bucket, are a 400
there (``VLLMValidationError``), and a pinned request without ``max_tokens`` leaves it capped (so vLLM's
output processor and the engine core agree on its limit). The engine core applies the same rules again
for requests that did not come through a front-end (an invalid one fails alone).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from rope_ext import RopeConfigError, RopeScaling, choose_factor
from rope_ext.policy import grows, may_outgrow, pinned_max_tokens, requested_max_tokens
from rope_ext.vllm_plugin import stats
from rope_ext.vllm_plugin.config import scaling_for_model
from rope_ext.vllm_plugin.versions import adapter

logger = logging.getLogger("vllm.ropeserve")

FACTOR_KEY = "rope_factor"
_UNSET = object()


@dataclasses.dataclass
class RopeState:
    """A request's scale in the engine core: the bucket it runs at now, the one it started at, whether an
    override pins it, whether it may grow, and the cache salt the client gave."""

    factor: float
    start: float
    pinned: bool
    growable: bool
    client_salt: str | None
    overflowed: bool = False


def salt_for(cache_salt: str | None, factor: float) -> str | None:
    """The cache salt of a request at ``factor``: unchanged at 1, else tagged with the factor."""
    if factor == 1:
        return cache_salt
    return f"{cache_salt or ''}|ropeserve-rope-factor={factor!r}"


def private_salt(cache_salt: str | None) -> str:
    """A cache salt no other request has (growth by re-rotation: such blocks are never shared)."""
    return f"{cache_salt or ''}|ropeserve-rerotate={uuid.uuid4().hex}"


def prompt_length(request) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0])


def fit_to_bucket(params, prompt_len: int, factor: float, scaling: RopeScaling, max_model_len: int) -> None:
    """Rule 5 on a pinned request's ``SamplingParams``: its ``max_tokens`` becomes what
    :func:`rope_ext.policy.pinned_max_tokens` allows (a ``max_tokens`` that reaches ``max_model_len``, vLLM's
    fill-in, is read as unset: the request stops at its bucket's capacity); raises
    :class:`rope_ext.CapacityExceededError` when the request cannot fit. Idempotent."""
    stated = requested_max_tokens(prompt_len, params.max_tokens, max_model_len)
    limit = pinned_max_tokens(prompt_len, stated, factor, scaling)
    if params.max_tokens is None or params.max_tokens > limit:
        params.max_tokens = limit


def admit(request, scaling: RopeScaling, max_model_len: int) -> RopeState:
    """Choose an ``EngineCoreRequest``'s factor, fit a pinned one to its bucket, salt its cache and record
    the factor in its sampling parameters; raises :class:`RopeConfigError` for an invalid override or a
    pinned request that does not fit (:class:`rope_ext.CapacityExceededError`), before changing anything."""
    params = request.sampling_params
    prompt_len = prompt_length(request)
    extra = dict(params.extra_args or {}) if params is not None else {}
    override = extra.get(FACTOR_KEY)
    max_tokens = requested_max_tokens(prompt_len, params.max_tokens, max_model_len) if params is not None else 0
    factor = choose_factor(prompt_len, max_tokens, scaling, override=override)
    pinned = override is not None
    if pinned and params is not None:
        fit_to_bucket(params, prompt_len, factor, scaling, max_model_len)
    growable = grows(scaling, pinned=pinned) and may_outgrow(prompt_len, max_tokens, factor, scaling)
    state = RopeState(factor, factor, pinned, growable, request.cache_salt)
    salt = private_salt(request.cache_salt) if scaling.growth == "rerotate" and growable else \
        salt_for(request.cache_salt, factor)
    if salt != request.cache_salt:
        request.cache_salt = salt
        adapter().forget_frontend_block_hashes(request)  # hashed under the old salt: the engine hashes again
    if params is not None:
        params.extra_args = {**extra, FACTOR_KEY: factor}
    logger.debug("request %s: prompt %d tokens, max_tokens %s, override %s -> rope factor %s%s",
                 request.request_id, prompt_len, max_tokens, override, factor, " (may grow)" if growable else "")
    return state


class EngineRope:
    """The engine core's view of a dynamic model: its scaling, served context and admissions counter."""

    def __init__(self, scaling: RopeScaling, max_model_len: int) -> None:
        self.scaling = scaling
        self.max_model_len = max_model_len
        self.admitted = stats.counters(stats.ADMITTED)
        stats.write_buckets(scaling.buckets)

    def index(self, factor: float) -> int:
        return self.scaling.buckets.index(factor)


def is_continuation(scheduler, request) -> bool:
    """A later chunk of a streaming-input session the scheduler already holds."""
    return bool(getattr(request, "resumable", False)) and request.request_id in scheduler.requests


def patch_engine_core() -> None:
    """Admit every request in ``EngineCore.preprocess_add_request`` (see the module docstring)."""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.preprocess_add_request
    if getattr(original, "_ropeserve", False):
        return

    def preprocess_add_request(self, request):
        from rope_ext.vllm_plugin.scheduler import scheduler_state

        scheduler_rope = scheduler_state(self.scheduler)
        if scheduler_rope is None or is_continuation(self.scheduler, request):
            return original(self, request)
        rope = scheduler_rope.rope
        state = admit(request, rope.scaling, rope.max_model_len)  # RopeConfigError: the request fails alone
        req, wave = original(self, request)
        req.ropeserve = state
        return req, wave

    preprocess_add_request._ropeserve = True
    preprocess_add_request.__wrapped__ = original
    EngineCore.preprocess_add_request = preprocess_add_request


def patch_input_processor() -> None:
    """The front-end's job: an invalid ``rope_factor``, or a pinned request that does not fit its bucket,
    is a 400 before the request goes anywhere; a pinned request without ``max_tokens`` is capped at its
    bucket (:func:`fit_to_bucket`)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_ropeserve", False):
        return

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        scaling = self.__dict__.get("_ropeserve_scaling", _UNSET)
        if scaling is _UNSET:
            scaling = self._ropeserve_scaling = scaling_for_model(self.model_config)
        params = request.sampling_params
        override = (params.extra_args or {}).get(FACTOR_KEY) if params is not None else None
        if scaling is not None and override is not None:
            try:
                prompt_len = prompt_length(request)
                factor = choose_factor(prompt_len, None, scaling, override=override)  # validates the override
                fit_to_bucket(params, prompt_len, factor, scaling, self.model_config.max_model_len)
            except RopeConfigError as exc:
                from vllm.exceptions import VLLMValidationError

                value = override if exc.field == FACTOR_KEY else None  # the message gives the lengths
                raise VLLMValidationError(str(exc), parameter=exc.field, value=value) from exc
        return request

    process_inputs._ropeserve = True
    process_inputs.__wrapped__ = original
    InputProcessor.process_inputs = process_inputs
