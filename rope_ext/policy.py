"""The per-request scale policy: from a request to the scale (bucket) it runs at, decided once.

The rule, for a model with original context L and buckets ``1 = s_0 < s_1 < ... < s_n = max_factor``:

1. A request's *planned length* is its prompt tokens plus its ``max_tokens`` when the client set it,
   or plus the engine's ``generation_reserve`` when it did not (vLLM fills a missing ``max_tokens``
   with the whole remaining context; that must not make a short request "long").
2. The needed scale is ``planned / L``; a planned length ``<= L`` needs scale 1, which is exactly plain
   RoPE with attention scaling 1, identical to the unscaled model.
3. A per-request override (a factor in ``[1, max_factor]``) replaces the needed scale.
4. The scale is never below the fine-tuned floor (``finetuned_factor``).
5. The request runs at the smallest bucket at or above that scale (the largest bucket if none is).

The result depends on nothing but the request and the settings, so the gateway and the engine compute
the same scale for the same request. Under ``growth="reserve"`` (the default) it never changes during the
request's life. Under ``growth="grow"`` the planned length in rule 1 is the prompt alone (the smallest
bucket that fits the prompt), and a request that may generate past that bucket's capacity
(:func:`may_outgrow`) moves, when it does, to :func:`bucket_for_length` of its new length, its cached
keys re-rotated (``rope_ext.rerotate``).
"""

from __future__ import annotations

import math
from numbers import Real

from rope_ext.config import RopeScaling
from rope_ext.errors import RopeConfigError


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


def planned_length(prompt_tokens: int, max_tokens: int | None, scaling: RopeScaling) -> int:
    """Prompt plus ``max_tokens``, or plus the generation reserve when ``max_tokens`` is absent."""
    for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
        if value is None and name == "max_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RopeConfigError(name, f"must be an integer >= 0 (got {value!r})")
    return prompt_tokens + (scaling.generation_reserve if max_tokens is None else max_tokens)


def choose_factor(prompt_tokens: int, max_tokens: int | None, scaling: RopeScaling, *,
                  override: object | None = None) -> float:
    """The bucket scale a request runs at (see the module docstring for the rule)."""
    length = planned_length(prompt_tokens, max_tokens, scaling)
    if scaling.growth == "grow":
        length = prompt_tokens
    if override is not None:
        needed = validate_override(override, scaling)
        return smallest_bucket_at_least(max(needed, scaling.finetuned_factor), scaling)
    # "bucket >= length / L", tested as "capacity(bucket) >= length": the rounded division could pick a
    # bucket one token too small (L=1285, bucket 1.4: 1799 / 1285 rounds to 1.4, but capacity is 1798).
    for bucket in scaling.buckets:
        if bucket >= scaling.finetuned_factor and scaling.capacity(bucket) >= length:
            return bucket
    return scaling.buckets[-1]


def bucket_for_length(length: int, scaling: RopeScaling, *, at_least: float = 1.0) -> float:
    """The smallest bucket ``>= at_least`` whose capacity holds ``length`` tokens (the largest if none)."""
    for bucket in scaling.buckets:
        if bucket >= at_least and scaling.capacity(bucket) >= length:
            return bucket
    return scaling.buckets[-1]


def may_outgrow(prompt_tokens: int, max_tokens: int | None, factor: float, scaling: RopeScaling) -> bool:
    """Whether a request admitted at ``factor`` under ``growth="grow"`` may need a larger bucket later:
    ``prompt + max_tokens`` (unbounded when ``max_tokens`` is None) exceeds the bucket's capacity and a
    larger bucket exists. Always False under ``growth="reserve"``."""
    if scaling.growth != "grow" or factor >= scaling.buckets[-1]:
        return False
    return max_tokens is None or prompt_tokens + max_tokens > scaling.capacity(factor)
