"""rope_ext against an independent float64 oracle written from the formulas of ROPE_NOTES.md section 1.

The oracle below uses numpy and math only and follows the notes' notation (rotary dim d, base b, pair i,
original context L, scale s, current length l); it shares no code with rope_ext. rope_ext computes in
float32, so values agree to a relative 1e-6 (measured worst case over this grid: 4.5e-7, float32 rounding
of the powers ``b ** (2i/d)`` at large bases).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rope_ext import (
    METHODS,
    RopeConfigError,
    RopeScaling,
    RotaryConfig,
    bucket_frequencies,
    bucket_method,
    compute_frequencies,
    find_correction_range,
    get_mscale,
)

REL_TOL = 1e-6


# --- the oracle (float64) -------------------------------------------------------------------------------

def plain(d: int, b: float) -> np.ndarray:
    return b ** (-2.0 * np.arange(d // 2, dtype=np.float64) / d)


def correction_dim(r: float, d: int, b: float, L: int) -> float:
    return d * math.log(L / (r * 2 * math.pi)) / (2 * math.log(b))


def correction_range(d: int, b: float, L: int, beta_fast: float, beta_slow: float,
                     truncate: bool) -> tuple[float, float]:
    low, high = correction_dim(beta_fast, d, b, L), correction_dim(beta_slow, d, b, L)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def by_parts(d: int, b: float, L: int, s: float, *, beta_fast: float = 32, beta_slow: float = 1,
             extrapolation_factor: float = 1.0, truncate: bool = True) -> np.ndarray:
    low, high = correction_range(d, b, L, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    mask = (1 - ramp) * extrapolation_factor
    extrapolated = plain(d, b)
    return extrapolated / s * (1 - mask) + extrapolated * mask


def yarn_temperature(s: float) -> float:
    return 1.0 if s <= 1 else 0.1 * math.log(s) + 1


def oracle(method: str, d: int, b: float, L: int, s: float, l: int | None = None,
           **knobs: float) -> tuple[np.ndarray, float]:
    """(inv_freq, attention factor) of ``method``; the dynamic methods use ``s`` as the floor of l / L."""
    if method == "default":
        return plain(d, b), 1.0
    if method == "linear":
        return plain(d, b) / s, 1.0
    if method == "ntk":
        return plain(d, b * s ** (d / (d - 2))), 1.0
    if method == "dynamic_ntk":
        l = L if l is None else l
        if l <= L:
            return plain(d, b), 1.0
        return plain(d, b * ((s * l / L) - (s - 1)) ** (d / (d - 2))), 1.0
    if method == "ntk_by_parts":
        return by_parts(d, b, L, s, **knobs), 1.0
    if method == "yarn":
        return by_parts(d, b, L, s, **knobs), yarn_temperature(s)
    dynamic = s if l is None else max(s, l / L)
    if method == "dynamic_yarn":
        return oracle("yarn", d, b, L, dynamic, **knobs)
    if method == "dynamic_linear":
        return oracle("linear", d, b, L, dynamic)
    if method == "longrope":  # knobs: the two lists; s is the served context over L
        long = (L * s if l is None else l) > L
        factors = np.asarray(knobs["long_factor" if long else "short_factor"], dtype=np.float64)
        return plain(d, b) / factors, math.sqrt(1 + math.log(s) / math.log(L)) if s > 1 else 1.0
    raise AssertionError(method)


def assert_close(ours: tuple[torch.Tensor, float], expected: tuple[np.ndarray, float]) -> None:
    inv, attention = ours
    ref_inv, ref_attention = expected
    assert inv.shape == ref_inv.shape
    rel = np.abs(inv.double().numpy() - ref_inv) / ref_inv
    assert rel.max() <= REL_TOL, f"max relative error {rel.max():.3g}"
    assert attention == pytest.approx(ref_attention, rel=1e-12)


# --- rope_ext against the oracle -------------------------------------------------------------------------

STATIC = ["default", "linear", "ntk", "ntk_by_parts", "yarn"]
GRID = list(itertools.product((64, 128), (1e4, 1e5, 1e6), (2048, 8192), (1, 2, 2.5, 8, 32)))


def test_oracle_covers_every_method() -> None:
    assert set(METHODS) == {*STATIC, "dynamic_ntk", "dynamic_yarn", "dynamic_linear", "longrope"}


@pytest.mark.parametrize(("d", "b", "L", "s"), [g for g in GRID if g[3] in (1, 8, 32)])
def test_longrope_matches_oracle(d: int, b: float, L: int, s: float) -> None:
    """Bucket 1 holds the short list, every larger bucket the long one, each at the default magnitude."""
    lists = {"short_factor": [1 + 0.03 * i for i in range(d // 2)], "long_factor": [1 + 3.1 * i for i in range(d // 2)]}
    scaling = RopeScaling(method="longrope", original_max_position=L, max_factor=32.0, **lists)
    for factor, seq_len in ((1.0, None), (32.0, None), (1.0, L), (1.0, L + 1)):
        expected = oracle("longrope", d, b, L, 32.0, seq_len if seq_len is not None else int(L * factor), **lists)
        assert_close(compute_frequencies("longrope", RotaryConfig(d, b), scaling, factor, seq_len), expected)
        assert_close(bucket_frequencies(RotaryConfig(d, b), scaling, factor), oracle(
            "longrope", d, b, L, 32.0, int(L * factor), **lists))


@pytest.mark.parametrize("method", STATIC)
@pytest.mark.parametrize(("d", "b", "L", "s"), GRID)
def test_static_methods_match_oracle(method: str, d: int, b: float, L: int, s: float) -> None:
    scaling = RopeScaling(method=method, original_max_position=L, max_factor=32.0)
    assert_close(compute_frequencies(method, RotaryConfig(d, b), scaling, s), oracle(method, d, b, L, s))


@pytest.mark.parametrize("method", ["dynamic_ntk", "dynamic_yarn", "dynamic_linear"])
@pytest.mark.parametrize(("d", "b", "L", "s"), GRID)
def test_dynamic_methods_match_oracle(method: str, d: int, b: float, L: int, s: float) -> None:
    scaling = RopeScaling(method=method, original_max_position=L, max_factor=32.0)
    rotary = RotaryConfig(d, b)
    for l in (None, 0, L // 3, L, L + 1, 3 * L, 5 * L + 11, 64 * L):
        assert_close(compute_frequencies(method, rotary, scaling, s, seq_len=l), oracle(method, d, b, L, s, l))


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("knobs", [
    {"beta_fast": 16.0, "beta_slow": 2.0},
    {"beta_fast": 64.0, "beta_slow": 0.5},
    {"extrapolation_factor": 0.5},
    {"extrapolation_factor": 0.0},
])
@pytest.mark.parametrize("method", ["ntk_by_parts", "yarn"])
def test_by_parts_knobs_match_oracle(method: str, knobs: dict, truncate: bool) -> None:
    scaling = RopeScaling(method=method, original_max_position=4096, max_factor=16.0, truncate=truncate, **knobs)
    ours = compute_frequencies(method, RotaryConfig(128, 5e5), scaling, 6.0)
    assert_close(ours, oracle(method, 128, 5e5, 4096, 6.0, truncate=truncate, **knobs))


def test_extrapolation_factor_zero_is_linear() -> None:
    scaling = RopeScaling(method="ntk_by_parts", original_max_position=4096, max_factor=8.0,
                          extrapolation_factor=0.0)
    inv, _ = compute_frequencies("ntk_by_parts", RotaryConfig(64, 1e4), scaling, 8)
    assert_close((inv, 1.0), oracle("linear", 64, 1e4, 4096, 8))


@pytest.mark.parametrize(("d", "b", "L"), [(64, 1e4, 2048), (64, 1e5, 8192), (128, 1e6, 32768), (128, 10.0, 4096)])
@pytest.mark.parametrize("truncate", [True, False])
def test_correction_range_matches_oracle(d: int, b: float, L: int, truncate: bool) -> None:
    assert find_correction_range(32, 1, d, b, L, truncate) == pytest.approx(
        correction_range(d, b, L, 32, 1, truncate), rel=1e-12)


def test_default_model_correction_range() -> None:
    # Head 64, theta 1e5, L 8192: dims 10.30 and 19.94, truncated to pairs [10, 20]: pairs up to 10
    # extrapolate, pairs from 20 on interpolate.
    assert find_correction_range(32, 1, 64, 1e5, 8192) == (10, 20)
    fractional = find_correction_range(32, 1, 64, 1e5, 8192, truncate=False)
    assert fractional == pytest.approx((10.3044, 19.9373), abs=1e-4)


@pytest.mark.parametrize(("s", "temperature"), [(2, 1.0693), (4, 1.1386), (8, 1.2079), (16, 1.2773), (32, 1.3466)])
def test_yarn_temperature_values(s: float, temperature: float) -> None:
    # The values ROPE_NOTES lists are 0.1 ln(s) + 1 itself (the factor on cos and sin); the logits scale
    # by its square (s = 2: 1.1434), not by these numbers as the notes' wording suggests.
    assert get_mscale(s) == pytest.approx(temperature, abs=1e-4)
    assert get_mscale(s) == yarn_temperature(s)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_yarn_temperature_is_one_at_or_below_one(s: float) -> None:
    assert get_mscale(s) == 1.0


# --- identities between methods --------------------------------------------------------------------------

@pytest.mark.parametrize(("d", "b", "L", "s"), GRID)
def test_dynamic_yarn_at_length_L_times_s_is_yarn_at_s(d: int, b: float, L: int, s: float) -> None:
    rotary = RotaryConfig(d, b)
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=32.0)
    dynamic = compute_frequencies("dynamic_yarn", rotary, scaling, 1, seq_len=int(L * s))
    static = compute_frequencies("yarn", rotary, scaling, s)
    assert torch.equal(dynamic.inv_freq, static.inv_freq)  # L * s / L == s exactly on this grid
    assert dynamic.attention_factor == static.attention_factor


@pytest.mark.parametrize(("d", "b", "L", "s"), GRID)
def test_dynamic_ntk_with_factor_one_at_length_L_times_s_is_ntk_at_s(d: int, b: float, L: int, s: float) -> None:
    # b * ((1 * L*s / L) - 0)^(d/(d-2)) = b * s^(d/(d-2)); the bases are computed along different float
    # paths, so the two agree to the oracle's tolerance rather than bit for bit.
    rotary = RotaryConfig(d, b)
    scaling = RopeScaling(method="dynamic_ntk", original_max_position=L, max_factor=32.0)
    dynamic = compute_frequencies("dynamic_ntk", rotary, scaling, 1, seq_len=int(L * s))
    static = compute_frequencies("ntk", rotary, scaling, s)
    rel = ((dynamic.inv_freq.double() - static.inv_freq.double()).abs() / static.inv_freq.double()).max()
    assert rel.item() <= REL_TOL
    assert_close(dynamic, oracle("ntk", d, b, L, s))


@pytest.mark.parametrize(("method", "static"), [
    ("dynamic_ntk", "ntk"), ("dynamic_yarn", "yarn"), ("dynamic_linear", "linear"),
    ("default", "default"), ("linear", "linear"), ("ntk", "ntk"), ("ntk_by_parts", "ntk_by_parts"),
    ("yarn", "yarn"),
])
def test_bucket_method_mapping(method: str, static: str) -> None:
    assert bucket_method(method) == static


def test_bucket_method_rejects_unknown_names_listing_known_ones() -> None:
    with pytest.raises(RopeConfigError) as info:
        bucket_method("dynamic")
    assert info.value.field == "method"
    assert all(name in str(info.value) for name in METHODS)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"longrope"}))  # its two tables: test_longrope_matches_oracle
@pytest.mark.parametrize("s", [2.0, 4.0, 8.0])
def test_bucket_holds_the_static_equivalent_at_s(method: str, s: float) -> None:
    # A bucket of scale s under a dynamic method is that method evaluated at length L * s.
    L = 4096
    scaling = RopeScaling(method=method, original_max_position=L, max_factor=8.0)
    inv, attention = bucket_frequencies(RotaryConfig(64, 1e5), scaling, s)
    if method in ("dynamic_ntk", "dynamic_yarn", "dynamic_linear"):
        expected = oracle(method, 64, 1e5, L, 1, int(L * s))
    else:
        expected = oracle(method, 64, 1e5, L, s)
    assert_close((inv, attention), expected)
