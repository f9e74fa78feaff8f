"""RoPE scaling methods: inverse frequencies and attention scaling, one pure function each.

Every method has one signature, ``fn(rotary, scaling, factor, seq_len=None) -> RopeFrequencies``, and is
registered by name in :data:`METHODS` (the transformers ``ROPE_INIT_FUNCTIONS`` habit). Notation: rotary
dim d, base b, original context L, scale s (``factor``), current length l (``seq_len``).

- ``default``: plain RoPE, ``inv_freq_i = 1 / b^(2i/d)``.
- ``linear`` (Position Interpolation): ``inv_freq / s``.
- ``ntk`` (NTK-aware): base ``b' = b * s^(d/(d-2))``.
- ``dynamic_ntk``: transformers' form ``b' = b * ((s*l/L) - (s-1))^(d/(d-2))`` with ``l = max(l, L)``.
- ``ntk_by_parts``: per-pair blend of interpolated and extrapolated frequencies by YaRN's ramp.
- ``yarn``: NTK-by-parts plus the attention temperature ``0.1*ln(s) + 1`` (times ``attn_factor``;
  DeepSeek's ``mscale``/``mscale_all_dim`` ratio or an explicit ``attention_factor`` override it).
- ``dynamic_yarn`` / ``dynamic_linear``: the static method at ``s = max(factor, l/L)``; ``factor`` acts
  as the floor (a model fine-tuned at s_ft never runs below it).
- ``longrope`` (Phi-3): per-pair factors ``inv_freq_i / f_i`` from the short list for lengths up to L and
  the long list past it, cos and sin times the list's magnitude (``sqrt(1 + ln(M/L) / ln L)`` by default,
  M the served context). The length is l when given (transformers' per-forward switch), else the bucket's
  capacity ``floor(L*s)``: bucket 1 is the short table, every larger one the long table.

Arithmetic follows vLLM 0.32.0 (``base ** (arange/d)``, the same blend order), so tables built from these
frequencies equal vLLM's bit for bit in float32.

Per-request scaling uses buckets of scale s. A bucket holds the table of the method's *static
equivalent* at s (:func:`bucket_method`): Dynamic NTK at length ``L*s`` with the paper's form is
NTK-aware at s, Dynamic YaRN at ``L*s`` is YaRN at s, dynamic linear is linear at s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from rope_ext.config import RopeScaling, RotaryConfig
from rope_ext.errors import RopeConfigError


class RopeFrequencies(NamedTuple):
    """Inverse frequencies (float32, ``rotary_dim // 2``) and the factor that multiplies cos and sin."""

    inv_freq: torch.Tensor
    attention_factor: float


MethodFn = Callable[[RotaryConfig, RopeScaling, float, "int | None"], RopeFrequencies]


# --- shared helpers (identical in the YaRN reference code, vLLM and transformers) ---------------------

def find_correction_dim(num_rotations: float, dim: int, base: float, original_max_position: int) -> float:
    """The (fractional) pair index whose wavelength makes ``num_rotations`` turns over L tokens."""
    return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def find_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_position: int, truncate: bool = True) -> tuple[float, float]:
    """Pairs below ``low`` extrapolate, above ``high`` interpolate; depends on L, b, d only, never on s."""
    low = find_correction_dim(beta_fast, dim, base, original_max_position)
    high = find_correction_dim(beta_slow, dim, base, original_max_position)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, num_pairs: int) -> torch.Tensor:
    """``clamp((i - low) / (high - low), 0, 1)`` for each pair i, as float32."""
    if low == high:
        high += 0.001  # avoid a division by zero, as the reference code does
    ramp = (torch.arange(num_pairs, dtype=torch.float32) - low) / (high - low)
    return torch.clamp(ramp, 0, 1)


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 1 for s <= 1, else ``0.1 * mscale * ln(s) + 1``."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: RopeScaling, factor: float) -> float:
    """The factor multiplying cos and sin under YaRN at scale ``factor`` (so logits scale by its square)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return float(get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim))
    return get_mscale(factor) * scaling.attn_factor


def _base_powers(rotary: RotaryConfig, base: float) -> torch.Tensor:
    d = rotary.rotary_dim
    return base ** (torch.arange(0, d, 2, dtype=torch.float) / d)


# --- the methods ----------------------------------------------------------------------------------------

def default(rotary: RotaryConfig, scaling: RopeScaling, factor: float = 1.0,
            seq_len: int | None = None) -> RopeFrequencies:
    """Plain RoPE; ``factor`` is ignored."""
    return RopeFrequencies(1.0 / _base_powers(rotary, rotary.base), 1.0)


def linear(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
           seq_len: int | None = None) -> RopeFrequencies:
    """Position Interpolation: every frequency divided by s."""
    inv_freq = 1.0 / _base_powers(rotary, rotary.base)
    return RopeFrequencies(inv_freq / factor, 1.0)


def ntk(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
        seq_len: int | None = None) -> RopeFrequencies:
    """NTK-aware: a larger base, ``b * s^(d/(d-2))``."""
    d = rotary.rotary_dim
    base = rotary.base * factor ** (d / (d - 2))
    return RopeFrequencies(1.0 / _base_powers(rotary, base), 1.0)


def dynamic_ntk(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
                seq_len: int | None = None) -> RopeFrequencies:
    """Dynamic NTK in transformers' form; plain RoPE for ``l <= L``."""
    d = rotary.rotary_dim
    L = scaling.original_max_position
    length = max(seq_len if seq_len is not None else L, L)
    base = rotary.base * ((factor * length / L) - (factor - 1)) ** (d / (d - 2))
    return RopeFrequencies(1.0 / _base_powers(rotary, base), 1.0)


def _by_parts_inv_freq(rotary: RotaryConfig, scaling: RopeScaling, factor: float) -> torch.Tensor:
    d = rotary.rotary_dim
    pos_freqs = _base_powers(rotary, rotary.base)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low, high = find_correction_range(scaling.beta_fast, scaling.beta_slow, d, rotary.base,
                                      scaling.original_max_position, scaling.truncate)
    mask = 1 - linear_ramp(low, high, d // 2)
    if scaling.extrapolation_factor != 1:
        mask = mask * scaling.extrapolation_factor
    return inv_freq_interpolation * (1 - mask) + inv_freq_extrapolation * mask


def ntk_by_parts(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
                 seq_len: int | None = None) -> RopeFrequencies:
    """Per-pair blend of interpolation and extrapolation, no attention temperature."""
    return RopeFrequencies(_by_parts_inv_freq(rotary, scaling, factor), 1.0)


def yarn(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
         seq_len: int | None = None) -> RopeFrequencies:
    """NTK-by-parts plus the attention temperature."""
    return RopeFrequencies(_by_parts_inv_freq(rotary, scaling, factor), yarn_attention_factor(scaling, factor))


def longrope_attention_factor(scaling: RopeScaling, long: bool) -> float:
    """The magnitude of LongRoPE's short or long table: the configured ``short_mscale``/``long_mscale``,
    else ``sqrt(1 + ln(max_factor) / ln(L))`` (1 when nothing is extended), as vLLM's
    ``Phi3LongRoPEScaledRotaryEmbedding`` computes it."""
    configured = scaling.long_mscale if long else scaling.short_mscale
    if configured is not None:
        return float(configured)
    if scaling.max_factor <= 1:
        return 1.0
    return math.sqrt(1 + math.log(scaling.max_factor) / math.log(scaling.original_max_position))


def longrope(rotary: RotaryConfig, scaling: RopeScaling, factor: float,
             seq_len: int | None = None) -> RopeFrequencies:
    """LongRoPE: the short-factor frequencies up to L, the long-factor ones past it."""
    length = scaling.capacity(factor) if seq_len is None else seq_len
    long = length > scaling.original_max_position
    name = "long_factor" if long else "short_factor"
    factors = getattr(scaling, name)
    if factors is None or len(factors) != rotary.rotary_dim // 2:
        raise RopeConfigError(name, f"longrope needs {rotary.rotary_dim // 2} factors (rotary_dim / 2) "
                              f"(got {None if factors is None else len(factors)})")
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * _base_powers(rotary, rotary.base))
    return RopeFrequencies(inv_freq, longrope_attention_factor(scaling, long))


def _dynamic_scale(scaling: RopeScaling, factor: float, seq_len: int | None) -> float:
    if seq_len is None:
        return factor
    return max(factor, seq_len / scaling.original_max_position)


def dynamic_yarn(rotary: RotaryConfig, scaling: RopeScaling, factor: float = 1.0,
                 seq_len: int | None = None) -> RopeFrequencies:
    """YaRN at ``s = max(factor, l / L)``."""
    return yarn(rotary, scaling, _dynamic_scale(scaling, factor, seq_len))


def dynamic_linear(rotary: RotaryConfig, scaling: RopeScaling, factor: float = 1.0,
                   seq_len: int | None = None) -> RopeFrequencies:
    """Position Interpolation at ``s = max(factor, l / L)``."""
    return linear(rotary, scaling, _dynamic_scale(scaling, factor, seq_len))


METHODS: dict[str, MethodFn] = {
    "default": default,
    "linear": linear,
    "ntk": ntk,
    "dynamic_ntk": dynamic_ntk,
    "ntk_by_parts": ntk_by_parts,
    "yarn": yarn,
    "dynamic_yarn": dynamic_yarn,
    "dynamic_linear": dynamic_linear,
    "longrope": longrope,
}

# What a bucket of scale s holds for each method (see the module docstring).
_BUCKET_METHODS: dict[str, str] = {"dynamic_ntk": "ntk", "dynamic_yarn": "yarn", "dynamic_linear": "linear"}


def bucket_method(method: str) -> str:
    """The static method whose table at scale s serves a bucket of scale s under ``method``."""
    _check_method(method)
    return _BUCKET_METHODS.get(method, method)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise RopeConfigError("method", f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")


def compute_frequencies(method: str, rotary: RotaryConfig, scaling: RopeScaling, factor: float,
                        seq_len: int | None = None) -> RopeFrequencies:
    """Validated entry point: look ``method`` up in :data:`METHODS` and apply it at scale ``factor``."""
    _check_method(method)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise RopeConfigError("factor", f"must be a finite number >= 1 (got {factor!r})")
    if factor < 1:
        raise RopeConfigError("factor", f"must be >= 1 (got {factor})")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
        raise RopeConfigError("seq_len", f"must be an integer >= 0 (got {seq_len!r})")
    return METHODS[method](rotary, scaling, factor, seq_len)
