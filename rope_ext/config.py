"""Frozen, validated configuration types for RoPE scaling.

``RotaryConfig`` describes the model's rotary embedding (rotary dim, base); ``RopeScaling`` describes how
it is extended (method, original context L, maximum factor, buckets, the paper's knobs and the
per-request policy settings; for LongRoPE, the model's two lists of per-pair factors). Both validate in
``__post_init__`` and raise :class:`RopeConfigError` naming the field and its allowed range.
``RopeScaling.from_rope_parameters`` reads a Hugging Face / vLLM ``rope_parameters`` dict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from rope_ext.errors import RopeConfigError

DEFAULT_GENERATION_RESERVE = 512
GROWTH_MODES = ("recompute", "reserve", "rerotate")
DEFAULT_GROWTH = "recompute"
DEFAULT_HEADROOM = 1.0


def _check_finite(field: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RopeConfigError(field, f"must be a number (got {value!r})")
    if not math.isfinite(value):
        raise RopeConfigError(field, f"must be finite (got {value!r})")


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    """The model's rotary embedding: rotated dims per head and the RoPE base (rope_theta)."""

    rotary_dim: int
    base: float = 10000.0

    def __post_init__(self) -> None:
        if isinstance(self.rotary_dim, bool) or not isinstance(self.rotary_dim, int):
            raise RopeConfigError("rotary_dim", f"must be an integer (got {self.rotary_dim!r})")
        # >= 4: NTK's base exponent d / (d - 2) is undefined at d = 2.
        if self.rotary_dim < 4 or self.rotary_dim % 2:
            raise RopeConfigError("rotary_dim", f"must be an even integer >= 4 (got {self.rotary_dim})")
        _check_finite("base", self.base)
        if self.base <= 1:
            raise RopeConfigError("base", f"must be > 1 (got {self.base})")

    @classmethod
    def from_head(cls, head_size: int, base: float, partial_rotary_factor: float = 1.0) -> RotaryConfig:
        """Rotary config as vLLM and transformers derive it: ``int(head_size * partial_rotary_factor)``."""
        _check_finite("partial_rotary_factor", partial_rotary_factor)
        if not 0.0 < partial_rotary_factor <= 1.0:
            raise RopeConfigError(
                "partial_rotary_factor", f"must be in (0, 1] (got {partial_rotary_factor})"
            )
        return cls(rotary_dim=int(head_size * partial_rotary_factor), base=base)


def default_buckets(max_factor: float) -> tuple[float, ...]:
    """Factors sqrt(2) apart from 1 up to ``max_factor`` (1, 1.41, 2, 2.83, 4, ...; the powers of two exact),
    plus ``max_factor`` itself when it is not one of them. Chosen by the evidence grid over powers of two
    (docs/RESULTS.md, "Deciding the policy"): as good at every length measured, better perplexity where a
    request fits the bucket between two powers."""
    buckets = [1.0]
    k = 1
    while (step := 2 ** (k / 2)) < max_factor:  # 2 ** 1.0, 2 ** 2.0, ... are exact
        buckets.append(step)
        k += 1
    if buckets[-1] != max_factor:
        buckets.append(float(max_factor))
    return tuple(buckets)


def format_factor(factor: float) -> str:
    """A factor as text, exact and short: ``2.0`` -> ``"2"``, ``1.5`` -> ``"1.5"``, the bucket sqrt(2) ->
    ``"1.4142135623730951"`` (the float itself: it reads back as the same bucket, e.g. as ``rope_factor``)."""
    short = f"{factor:g}"
    return short if float(short) == factor else repr(float(factor))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE is extended past the original context, and how a request's scale is chosen.

    ``method`` names an entry of :data:`rope_ext.methods.METHODS`. ``original_max_position`` is the
    training context L; ``max_factor`` the largest scale served, so the served context is
    ``floor(L * max_factor)``. ``buckets`` are the scales a request may run at (default: factors sqrt(2)
    apart up to ``max_factor``, :func:`default_buckets`). ``generation_reserve`` is the room assumed for
    generation when a request does not say its ``max_tokens``, and under the growth modes how far ahead a
    request's first bucket looks.
    ``finetuned_factor`` is the factor a model was fine-tuned at with YaRN: no request runs below it.
    ``headroom`` (>= 1) sizes buckets past L for ``headroom`` times the length. ``growth`` says how a
    request's generation is provided for: ``"recompute"`` (default) and ``"rerotate"`` admit it at the
    bucket of its prompt and its next ``generation_reserve`` tokens (at most) and move it to the bucket its
    length needs when it outgrows one (its cached tokens recomputed at the new scale, or its cached keys
    re-rotated, ``rope_ext.rerotate``); ``"reserve"`` sizes its bucket for prompt plus generation up front
    and keeps it. See :mod:`rope_ext.policy`. The rest are the paper's and transformers' knobs.

    LongRoPE (``method="longrope"``, Phi-3/3.5/4-mini) has two tables, not a family of scales: the
    ``short_factor`` list for lengths up to L and the ``long_factor`` list past it, each with its magnitude
    (``short_mscale``/``long_mscale``, default ``sqrt(1 + ln(max_factor) / ln(L))`` as vLLM computes it).
    Its buckets are exactly ``(1, max_factor)`` with ``max_factor = max_position_embeddings / L``: bucket 1
    names the short-factor table, ``max_factor`` the long-factor one.
    """

    method: str = "dynamic_yarn"
    original_max_position: int = 4096
    max_factor: float = 1.0
    buckets: tuple[float, ...] | None = None
    generation_reserve: int = DEFAULT_GENERATION_RESERVE
    finetuned_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    extrapolation_factor: float = 1.0
    attn_factor: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    growth: str = DEFAULT_GROWTH
    headroom: float = DEFAULT_HEADROOM
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    short_mscale: float | None = None
    long_mscale: float | None = None

    def __post_init__(self) -> None:
        from rope_ext.methods import METHODS  # local: methods imports this module

        if self.method not in METHODS:
            raise RopeConfigError(
                "method", f"unknown method {self.method!r}; known methods: {', '.join(sorted(METHODS))}"
            )
        L = self.original_max_position
        if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
            raise RopeConfigError("original_max_position", f"must be an integer > 0 (got {L!r})")
        for name in ("max_factor", "finetuned_factor", "beta_fast", "beta_slow", "extrapolation_factor",
                     "attn_factor", "headroom"):
            _check_finite(name, getattr(self, name))
        for name in ("mscale", "mscale_all_dim", "attention_factor", "short_mscale", "long_mscale"):
            _check_finite(name, getattr(self, name), optional=True)
        if self.max_factor < 1:
            raise RopeConfigError("max_factor", f"must be >= 1 (got {self.max_factor})")
        if not 1 <= self.finetuned_factor <= self.max_factor:
            raise RopeConfigError(
                "finetuned_factor",
                f"must be in [1, max_factor={self.max_factor}] (got {self.finetuned_factor})",
            )
        if self.headroom < 1:
            raise RopeConfigError("headroom", f"must be >= 1 (got {self.headroom})")
        if self.beta_fast <= self.beta_slow:
            raise RopeConfigError(
                "beta_fast", f"must be > beta_slow={self.beta_slow} (got {self.beta_fast})"
            )
        if self.beta_slow <= 0:
            raise RopeConfigError("beta_slow", f"must be > 0 (got {self.beta_slow})")
        if not 0 <= self.extrapolation_factor <= 1:
            raise RopeConfigError(
                "extrapolation_factor", f"must be in [0, 1] (got {self.extrapolation_factor})"
            )
        for name in ("attn_factor", "attention_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RopeConfigError(name, f"must be > 0 (got {value})")
        reserve = self.generation_reserve
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise RopeConfigError("generation_reserve", f"must be an integer >= 0 (got {reserve!r})")
        if self.growth not in GROWTH_MODES:
            raise RopeConfigError("growth", f"must be one of {', '.join(GROWTH_MODES)} (got {self.growth!r})")
        self._check_longrope()
        buckets = self._default_buckets() if self.buckets is None else tuple(self.buckets)
        for value in buckets:
            _check_finite("buckets", value)
        if not buckets or buckets != tuple(sorted(set(buckets))):
            raise RopeConfigError("buckets", f"must be a non-empty, strictly increasing list (got {buckets})")
        if buckets[0] != 1 or buckets[-1] != self.max_factor:
            raise RopeConfigError(
                "buckets", f"must start at 1 and end at max_factor={self.max_factor} (got {list(buckets)})"
            )
        object.__setattr__(self, "buckets", tuple(float(b) for b in buckets))
        if self.method == "longrope" and self.buckets != self._default_buckets():
            raise RopeConfigError("buckets", "LongRoPE has two tables, short and long: its buckets are exactly "
                                  f"{list(self._default_buckets())} (got {list(self.buckets)})")

    def _default_buckets(self) -> tuple[float, ...]:
        if self.method == "longrope":
            return (1.0,) if self.max_factor == 1 else (1.0, float(self.max_factor))
        return default_buckets(self.max_factor)

    def _check_longrope(self) -> None:
        """The LongRoPE lists, where given: non-empty, equal lengths, finite and > 0; stored as tuples. (The
        method itself requires them and checks their length against the rotary dim.)"""
        lengths = set()
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise RopeConfigError(name, f"must be a list of numbers (got {value!r})")
            value = tuple(value)
            for x in value:
                _check_finite(name, x)
                if x <= 0:
                    raise RopeConfigError(name, f"must be a list of numbers > 0 (got {x!r})")
            if not value:
                raise RopeConfigError(name, "must not be empty")
            lengths.add(len(value))
            object.__setattr__(self, name, tuple(float(x) for x in value))
        if len(lengths) > 1:
            raise RopeConfigError("long_factor", "must have as many entries as short_factor "
                                  f"(got {len(self.long_factor)} and {len(self.short_factor)})")
        for name in ("short_mscale", "long_mscale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RopeConfigError(name, f"must be > 0 (got {value})")

    @property
    def max_context(self) -> int:
        """The served context in tokens: ``floor(L * max_factor)``."""
        return math.floor(self.original_max_position * self.max_factor)

    def capacity(self, factor: float) -> int:
        """Tokens a request at scale ``factor`` may hold before it outgrows its bucket: ``floor(L * s)``."""
        return math.floor(self.original_max_position * factor)

    @classmethod
    def from_rope_parameters(cls, params: Mapping[str, Any], *, max_position_embeddings: int | None = None
                             ) -> RopeScaling:
        """Read a ``rope_parameters`` dict (the keys transformers and vLLM use, plus ours).

        ``rope_type`` is the method; ``factor`` the maximum factor; ``original_max_position_embeddings``
        is L (falling back to ``max_position_embeddings``). Our keys: ``buckets``,
        ``generation_reserve``, ``finetuned_factor``, ``extrapolation_factor``, ``attn_factor``, ``growth``,
        ``headroom``. For ``longrope`` the maximum factor is ``max_position_embeddings / L`` (the context
        vLLM serves; a ``factor`` key only sets transformers' attention factor, which vLLM ignores), and
        ``short_factor``, ``long_factor``, ``short_mscale`` and ``long_mscale`` are read.
        """
        L = params.get("original_max_position_embeddings", max_position_embeddings)
        if L is None:
            raise RopeConfigError("original_max_position", "is required (original_max_position_embeddings)")
        kwargs: dict[str, Any] = {
            "method": params.get("rope_type", params.get("type", "dynamic_yarn")),
            "original_max_position": L,
            "max_factor": params.get("factor", 1.0),
        }
        if kwargs["method"] == "longrope":
            if max_position_embeddings is None:
                raise RopeConfigError("max_position_embeddings", "is required for longrope (the served context)")
            kwargs["max_factor"] = max_position_embeddings / L
        for key in ("generation_reserve", "finetuned_factor", "beta_fast", "beta_slow",
                    "extrapolation_factor", "attn_factor", "mscale", "mscale_all_dim",
                    "attention_factor", "truncate", "growth", "headroom", "short_factor", "long_factor",
                    "short_mscale", "long_mscale"):
            if params.get(key) is not None:
                kwargs[key] = params[key]
        if params.get("buckets") is not None:
            kwargs["buckets"] = tuple(params["buckets"])
        return cls(**kwargs)
