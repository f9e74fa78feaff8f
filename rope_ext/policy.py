"""The per-request scale policy: which bucket a request runs at, when it starts and as it grows.

This module is the one place that decides a request's RoPE scale; the engine plugin, the gateway and
the benchmarks all call it. For a model with original context L and buckets
``1 = s_0 < s_1 < ... < s_n = max_factor``:

1. A length of ``n`` tokens *needs* the smallest bucket whose capacity ``floor(L * s)`` holds it
   (:func:`bucket_for_length`); ``n <= L`` needs scale 1, exactly plain RoPE with attention scaling 1,
   identical to the unscaled model. With ``headroom`` h > 1, a length past L needs the bucket that holds
   ``ceil(h * n)`` instead (room to spare at the top of a bucket); lengths at or below L are unaffected.
2. The bucket is never below the fine-tuned floor (``finetuned_factor``).
3. At admission (:func:`choose_factor`) the length is the request's *planned length*: its prompt plus
   ``max_tokens`` when the client set it, or plus the ``generation_reserve`` when it did not (vLLM fills a
   missing ``max_tokens`` with the whole remaining context; that must not make a short request "long").
   Under the growth modes (``"recompute"``, the default, and ``"rerotate"``) the generation counted is
   at most the ``generation_reserve``: a request starts at the bucket that holds its prompt and its next
   ``generation_reserve`` tokens, and grows past them by rule 4. The scale follows the length, as in the
   paper's Dynamic Scaling, looking that far ahead so that a request is not computed once more right
   after its prefill (``generation_reserve = 0`` is the paper's rule exactly: the prompt alone). Under
   ``growth="reserve"`` the whole planned length counts and the factor is kept.
   A ``max_tokens`` that reaches the end of the context is read as not set (:func:`requested_max_tokens`):
   the engine sees no difference between the two.
4. Under a growth mode, a request about to compute a token past its bucket's capacity moves to the
   bucket its new length needs (:func:`grown_factor`); how its cached tokens follow is the engine's
   mechanism (a recompute at the new scale, or re-rotated keys). Under ``"reserve"`` the factor never
   changes during the request's life.
5. A per-request override (a factor in ``[1, max_factor]``, rounded up to a bucket, never below the
   floor) replaces all of the above and pins the request to that bucket for its whole life: the client
   chose its scale. Such a request must fit its bucket, since it never grows (:func:`pinned_max_tokens`):
   prompt plus ``max_tokens`` above the bucket's capacity is refused (a context-length error naming the
   capacity), and a request without ``max_tokens`` stops at the capacity (its ``max_tokens`` becomes
   ``capacity - prompt``, finish reason ``length``). So no request computes a token past its bucket,
   pinned or not, but one under ``"reserve"`` without ``max_tokens`` (sized for the generation reserve).

The result depends on nothing but the request and the settings: the same request gets the same scale
wherever the policy runs.
"""

from __future__ import annotations

import math
from numbers import Real

from rope_ext.config import RopeScaling, format_factor
from rope_ext.errors import CapacityExceededError, RopeConfigError


def validate_override(value: object, scaling: RopeScaling, *, field: str = "rope_factor") -> float:
    """A client-requested factor as a float in ``[1, max_factor]``, or :class:`RopeConfigError`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RopeConfigError(field, f"must be a number in [1, {scaling.max_factor}] (got {value!r})")
    factor = float(value)
    if not math.isfinite(factor) or not 1 <= factor <= scaling.max_factor:
        raise RopeConfigError(field, f"must be a number in [1, {scaling.max_factor}] (got {value!r})")
    return factor


def smallest_bucket_at_least(scale: float, scaling: RopeScaling) -> float:
    """The smallest bucket ``>= scale``; the largest bucket when ``scale`` exceeds them all."""
    for bucket in scaling.buckets:
        if bucket >= scale:
            return bucket
    return scaling.buckets[-1]


def requested_max_tokens(prompt_tokens: int, max_tokens: int | None, context: int) -> int | None:
    """``max_tokens`` as a limit, or None when it is absent or reaches the end of the ``context``: vLLM fills
    a missing ``max_tokens`` with the rest of the context, so the engine cannot tell the two apart, and
    every caller reads both as "not set" (rule 3)."""
    if max_tokens is None or prompt_tokens + max_tokens >= context:
        return None
    return max_tokens


def planned_length(prompt_tokens: int, max_tokens: int | None, scaling: RopeScaling) -> int:
    """Prompt plus ``max_tokens``, or plus the generation reserve when ``max_tokens`` is absent."""
    for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
        if value is None and name == "max_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RopeConfigError(name, f"must be an integer >= 0 (got {value!r})")
    return prompt_tokens + (scaling.generation_reserve if max_tokens is None else max_tokens)


def bucket_for_length(length: int, scaling: RopeScaling, *, at_least: float = 1.0) -> float:
    """The smallest bucket ``>= at_least`` (and the fine-tuned floor) that holds ``length`` tokens, with
    the headroom past L (rule 1); the largest bucket when none does."""
    if length > scaling.original_max_position and scaling.headroom > 1:
        length = math.ceil(scaling.headroom * length)
    floor = max(at_least, scaling.finetuned_factor)
    # "capacity(bucket) >= length" rather than "bucket >= length / L": the rounded division could pick a
    # bucket one token too small (L=1285, bucket 1.4: 1799 / 1285 rounds to 1.4, but capacity is 1798).
    for bucket in scaling.buckets:
        if bucket >= floor and scaling.capacity(bucket) >= length:
            return bucket
    return scaling.buckets[-1]


def choose_factor(prompt_tokens: int, max_tokens: int | None, scaling: RopeScaling, *,
                  override: object | None = None) -> float:
    """The bucket a request starts at (rules 1-3 and 5 of the module docstring)."""
    length = planned_length(prompt_tokens, max_tokens, scaling)
    if override is not None:
        needed = validate_override(override, scaling)
        return smallest_bucket_at_least(max(needed, scaling.finetuned_factor), scaling)
    if scaling.growth != "reserve":  # look ahead at most the reserve; growth provides for the rest
        length = prompt_tokens + min(length - prompt_tokens, scaling.generation_reserve)
    return bucket_for_length(length, scaling)


def pinned_max_tokens(prompt_tokens: int, max_tokens: int | None, factor: float, scaling: RopeScaling) -> int:
    """Rule 5: the ``max_tokens`` a request pinned to the bucket ``factor`` runs with, so that it never
    holds more than the bucket's capacity ``floor(L * s)`` (a pinned request never grows).

    ``max_tokens`` is the client's own limit, None when it set none (as :func:`requested_max_tokens` reads
    it). A set limit is kept when the prompt plus it fits the capacity (the same arithmetic as vLLM's own
    context check: prompt + max_tokens <= the context); an unset one becomes ``capacity - prompt_tokens``,
    so the request stops at the capacity with finish reason ``length``. Anything else raises
    :class:`CapacityExceededError`, whose message names the most the bucket holds: a set limit that does
    not fit, or a prompt that leaves no room for one generated token::

        pinned_max_tokens(7900, None, 1.0, scaling)   # -> 292 (L = 8192)
        pinned_max_tokens(7900, 600, 1.0, scaling)    # CapacityExceededError: "... holds at most 8192 ..."
    """
    capacity = scaling.capacity(factor)
    holds = f"This request's rope_factor {format_factor(factor)} holds at most {capacity} tokens"
    if max_tokens is not None:
        if prompt_tokens + max_tokens <= capacity:
            return max_tokens
        raise CapacityExceededError(
            "max_tokens", f"{holds}; the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
            f"{prompt_tokens + max_tokens}. Reduce the length of the prompt or max_tokens, or ask for a larger "
            "rope_factor or none.", capacity=capacity)
    if prompt_tokens < capacity:
        return capacity - prompt_tokens
    raise CapacityExceededError(
        "prompt", f"{holds}; the prompt ({prompt_tokens} tokens) leaves no room for a generated token. Reduce "
        "the length of the prompt, or ask for a larger rope_factor or none.", capacity=capacity)


def grows(scaling: RopeScaling, *, pinned: bool = False) -> bool:
    """Whether requests may move to a larger bucket: a growth mode, and no override pinning it."""
    return scaling.growth != "reserve" and not pinned


def grown_factor(factor: float, length: int, scaling: RopeScaling) -> float | None:
    """Rule 4: the bucket a growing request at ``factor`` moves to before it holds ``length`` tokens, or
    None when it stays (``length`` fits its bucket, or it is at the largest one)."""
    if length <= scaling.capacity(factor) or factor >= scaling.buckets[-1]:
        return None
    new = bucket_for_length(length, scaling, at_least=factor)
    return new if new > factor else None


def factor_at(start: float, length: int, scaling: RopeScaling, *, pinned: bool = False) -> float:
    """The bucket a request that started at ``start`` runs at once it holds ``length`` tokens, growing one
    token per step as a decoding request does (rule 4 applied at each crossing); ``start`` when it does not
    grow. For a finished request, ``length`` is its prompt plus its generated tokens minus one (the last
    token it sampled was never computed)."""
    factor = start
    if not grows(scaling, pinned=pinned):
        return factor
    while (new := grown_factor(factor, min(length, scaling.capacity(factor) + 1), scaling)) is not None:
        factor = new
    return factor


def may_outgrow(prompt_tokens: int, max_tokens: int | None, factor: float, scaling: RopeScaling) -> bool:
    """Whether a request admitted at ``factor`` under a growth mode may need a larger bucket later:
    ``prompt + max_tokens`` (unbounded when ``max_tokens`` is None) exceeds the bucket's capacity and a
    larger bucket exists. Always False under ``growth="reserve"``."""
    if scaling.growth == "reserve" or factor >= scaling.buckets[-1]:
        return False
    return max_tokens is None or prompt_tokens + max_tokens > scaling.capacity(factor)
