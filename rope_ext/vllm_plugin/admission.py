"""Admission: each request's scale is decided once, in vLLM's ``InputProcessor``, by the rope_ext policy.

``process_inputs`` builds the ``EngineCoreRequest`` in the front-end process (API server or ``vllm.LLM``).
We wrap it: the policy reads the prompt length, ``max_tokens`` and an optional override
``vllm_xargs={"rope_factor": s}``, and the chosen factor is written into
``sampling_params.extra_args["rope_factor"]`` (with ``"rope_capacity"``, the tokens it may hold before it
outgrows its bucket), where the model runner reads it for every step.

``max_tokens``: vLLM fills a missing ``max_tokens`` with the remaining context before we see it, so a
``max_tokens`` that reaches ``max_model_len`` is read as "not set" and the generation reserve is used.

Prefix caching: vLLM's block hash covers tokens, LoRA, multimodal inputs and ``cache_salt``, not RoPE.
Keys cached at one scale are wrong at another, so a request at a factor other than 1 gets its factor
appended to its ``cache_salt``: blocks are shared only between requests at the same scale. Factor-1
requests keep their salt, sharing blocks with each other exactly as stock vLLM does. Under
``growth: "rerotate"`` a request that may outgrow its bucket gets a salt of its own (see ``.regrow``).
"""

from __future__ import annotations

import logging

from rope_ext import RopeConfigError, RopeScaling, choose_factor
from rope_ext.vllm_plugin.config import scaling_for_model
from rope_ext.vllm_plugin.metrics import rope_metrics
from rope_ext.vllm_plugin.regrow import GROWTH_KEY, growable_salt, plan_growth

logger = logging.getLogger("vllm.ropeserve")

FACTOR_KEY = "rope_factor"
CAPACITY_KEY = "rope_capacity"  # tokens the request may hold before it outgrows its bucket (L * s)
_UNSET = object()


def salt_for(cache_salt: str | None, factor: float) -> str | None:
    """The cache salt of a request at ``factor``: unchanged at 1, else tagged with the factor."""
    if factor == 1:
        return cache_salt
    return f"{cache_salt or ''}|ropeserve-rope-factor={factor!r}"


def requested_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int | None:
    """``max_tokens`` as the client set it, or None when vLLM filled it with the remaining context."""
    if max_tokens is None or prompt_len + max_tokens >= max_model_len:
        return None
    return max_tokens


def admit(request, scaling: RopeScaling, max_model_len: int) -> float | None:
    """Choose the request's factor and record it in the request (extra_args, cache_salt)."""
    params = request.sampling_params
    if params is None:  # pooling requests carry no generation; they run at scale 1 (no extra_args)
        return None
    if request.prompt_token_ids is not None:
        prompt_len = len(request.prompt_token_ids)
    else:
        prompt_len = int(request.prompt_embeds.shape[0])
    extra = dict(params.extra_args or {})
    override = extra.get(FACTOR_KEY)
    max_tokens = requested_max_tokens(prompt_len, params.max_tokens, max_model_len)
    growable = False
    try:
        factor = choose_factor(prompt_len, max_tokens, scaling, override=override)
        if scaling.growth == "rerotate":  # see .regrow: larger buckets as the request grows
            factor, growable = plan_growth(scaling, factor, prompt_len, max_tokens, n=params.n, override=override)
    except RopeConfigError as exc:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(str(exc), parameter=FACTOR_KEY, value=override) from exc
    extra[FACTOR_KEY] = factor
    # A growable request outgrows its bucket for good only past the largest one.
    extra[CAPACITY_KEY] = scaling.capacity(scaling.buckets[-1] if growable else factor)
    if growable:
        extra[GROWTH_KEY] = True
    params.extra_args = extra
    request.cache_salt = growable_salt(request.cache_salt) if growable else salt_for(request.cache_salt, factor)
    rope_metrics()[0].observe(factor)
    logger.debug("request %s: prompt %d tokens, max_tokens %s, override %s -> rope factor %s",
                 request.request_id, prompt_len, params.max_tokens, override, factor)
    return factor


def patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_ropeserve", False):
        return

    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        scaling = getattr(self, "_ropeserve_scaling", _UNSET)
        if scaling is _UNSET:
            scaling = self._ropeserve_scaling = scaling_for_model(self.model_config)
        if scaling is not None:
            admit(request, scaling, self.model_config.max_model_len)
        return request

    process_inputs._ropeserve = True
    process_inputs.__wrapped__ = original
    InputProcessor.process_inputs = process_inputs


def patch_output_processor() -> None:
    """Count requests that finished past their bucket's capacity (they kept their scale)."""
    from vllm.v1.engine.output_processor import OutputProcessor

    if getattr(OutputProcessor._finish_request, "_ropeserve", False):
        return
    original_add, original_finish = OutputProcessor.add_request, OutputProcessor._finish_request

    def add_request(self, request, *args, **kwargs) -> None:
        original_add(self, request, *args, **kwargs)
        state = self.request_states.get(request.request_id)
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        if state is not None and extra and CAPACITY_KEY in extra:
            state._ropeserve_capacity = extra[CAPACITY_KEY]

    def _finish_request(self, req_state) -> None:
        original_finish(self, req_state)
        capacity = getattr(req_state, "_ropeserve_capacity", None)
        if capacity is None or req_state.detokenizer is None:
            return
        if req_state.prompt_len + req_state.detokenizer.num_output_tokens() > capacity:
            rope_metrics()[1].inc()

    add_request.__wrapped__, _finish_request.__wrapped__ = original_add, original_finish
    _finish_request._ropeserve = True
    OutputProcessor.add_request, OutputProcessor._finish_request = add_request, _finish_request
