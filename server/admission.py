"""Admission of one generation request in the gateway: the context check, and the factor it will run at.

The engine decides every request's factor (the plugin's engine-core admission, with
:mod:`rope_ext.policy`); the gateway only answers what it must before the engine does. Given the prompt's
token count, the request's ``max_tokens`` (or None) and its optional ``rope_factor`` / ``rope_method``,
:func:`admit` either refuses the request (400, before it reaches an engine) or returns the factor the engine
will start it at, by the same call the engine makes (so ``x-rope-factor`` is known before the answer). A
request pinned by an override must fit its bucket (:func:`rope_ext.pinned_max_tokens`, as the engine
applies it): one that does not is a 400 ``context_length_exceeded`` naming the bucket's capacity, and one
without ``max_tokens`` is capped by the engine at the capacity (``Admission.pinned_limit``; it finishes with
reason ``length``). The gateway forwards only the client's own override (``vllm_xargs.rope_factor``);
:func:`final_factor` gives the factor a finished request ended at, from its usage, by the same rule the
engine grows by::

    admission = admit(prompt_tokens=12000, max_tokens=256, scaling=scaling)   # Admission(factor=2.0, ...)
"""

from __future__ import annotations

import dataclasses

from rope_ext import CapacityExceededError, RopeScaling, choose_factor, pinned_max_tokens, planned_length
from rope_ext.policy import factor_at, requested_max_tokens
from server.errors import ContextLengthExceeded, InvalidRequest

PLAIN_ROPE = "default"


@dataclasses.dataclass(frozen=True)
class Admission:
    prompt_tokens: int
    max_tokens: int | None
    planned_tokens: int
    factor: float
    override: object | None = None  # what the client asked for (forwarded to the engine), None for the policy
    pinned_limit: int | None = None  # a pinned request's max_tokens as the engine runs it; None when not pinned


def resolve_override(rope_factor: object | None, rope_method: str | None, xargs_factor: object | None,
                     scaling: RopeScaling) -> object | None:
    """The factor a client asked for, from ``rope_factor``, ``vllm_xargs.rope_factor`` or ``rope_method``
    (validated later by :func:`rope_ext.validate_override`), or None to let the policy choose."""
    if xargs_factor is not None:
        if rope_factor is not None and xargs_factor != rope_factor:
            raise InvalidRequest(f"rope_factor ({rope_factor}) and vllm_xargs.rope_factor ({xargs_factor}) "
                                 "disagree; set one of them", param="rope_factor")
        rope_factor = xargs_factor
    if rope_method is None or rope_method == scaling.method:
        return rope_factor
    if rope_method != PLAIN_ROPE:
        raise InvalidRequest(f"rope_method {rope_method!r} is not served here; served methods: "
                             f"{scaling.method!r}, {PLAIN_ROPE!r} (plain RoPE)", param="rope_method")
    if scaling.finetuned_factor > 1:
        raise InvalidRequest(f"rope_method {PLAIN_ROPE!r} is not available: the model was fine-tuned at "
                             f"factor {scaling.finetuned_factor:g} and never runs below it",
                             param="rope_method")
    if rope_factor is not None and rope_factor != 1:
        raise InvalidRequest(f"rope_method {PLAIN_ROPE!r} means factor 1, but rope_factor is {rope_factor}",
                             param="rope_method")
    return 1.0


def admit(prompt_tokens: int, max_tokens: int | None, scaling: RopeScaling, *, override: object | None = None,
          prompt_param: str = "prompt") -> Admission:
    """Refuse a request that cannot fit the served context, else choose its factor (see module docstring)."""
    limit = scaling.max_context
    if prompt_tokens > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_tokens} tokens. Please reduce the length of the prompt.", param=prompt_param)
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens.", param="max_tokens")
    stated = requested_max_tokens(prompt_tokens, max_tokens, limit)  # as the engine will read it
    factor = choose_factor(prompt_tokens, stated, scaling, override=override)
    pinned_limit = None
    if override is not None:  # pinned: it must fit its bucket, as the engine will check
        try:
            pinned_limit = pinned_max_tokens(prompt_tokens, stated, factor, scaling)
        except CapacityExceededError as exc:
            raise ContextLengthExceeded(str(exc), param=prompt_param if exc.field == "prompt" else exc.field) \
                from None
    return Admission(prompt_tokens, max_tokens, planned_length(prompt_tokens, stated, scaling), factor,
                     override, pinned_limit)


def final_factor(admission: Admission, prompt_tokens: int, completion_tokens: int, scaling: RopeScaling) -> float:
    """The factor a request admitted as ``admission`` ended at, having generated ``completion_tokens``
    (one choice): it grew through every bucket boundary it crossed, unless pinned or reserved."""
    length = prompt_tokens + max(completion_tokens - 1, 0)
    return factor_at(admission.factor, length, scaling, pinned=admission.override is not None)
