"""Validation of rope_ext's settings: every invalid field raises :class:`RopeConfigError` whose ``.field``
names it and whose message starts with that name (the server maps these to a 400 in one place).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from rope_ext import (
    METHODS,
    RopeConfigError,
    RopeScaling,
    RotaryConfig,
    choose_factor,
    compute_frequencies,
    planned_length,
    validate_override,
)


def assert_rejects(field: str, build: Callable[..., object], /, *args: object,
                   **kwargs: object) -> RopeConfigError:
    """``build(*args, **kwargs)`` raises a RopeConfigError (a ValueError) naming ``field``."""
    with pytest.raises(RopeConfigError) as info:
        build(*args, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)
    return info.value


# --- RopeScaling ---------------------------------------------------------------------------------------

FLOAT_FIELDS = ["max_factor", "finetuned_factor", "beta_fast", "beta_slow", "extrapolation_factor",
                "attn_factor", "mscale", "mscale_all_dim", "attention_factor"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_floats_are_rejected(field: str, bad: float) -> None:
    error = assert_rejects(field, RopeScaling, **{"max_factor": 8.0, field: bad})
    assert "finite" in str(error)


@pytest.mark.parametrize("bad", ["2", True, [2.0]])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_numbers_are_rejected(field: str, bad: object) -> None:
    assert_rejects(field, RopeScaling, **{"max_factor": 8.0, field: bad})


def test_unknown_method_lists_the_known_ones() -> None:
    error = assert_rejects("method", RopeScaling, method="dynamic")
    assert "'dynamic'" in str(error)
    assert all(name in str(error) for name in METHODS)
    error = assert_rejects("method", compute_frequencies, "llama3", RotaryConfig(64), RopeScaling(), 1.0)
    assert all(name in str(error) for name in METHODS)


@pytest.mark.parametrize("L", [0, -1, 4096.0, True, None, "4096"])
def test_original_context_must_be_a_positive_integer(L: object) -> None:
    assert_rejects("original_max_position", RopeScaling, original_max_position=L)


@pytest.mark.parametrize("max_factor", [0.5, 0.0, -2.0])
def test_max_factor_below_one_is_rejected(max_factor: float) -> None:
    assert_rejects("max_factor", RopeScaling, max_factor=max_factor)


@pytest.mark.parametrize("finetuned", [0.5, 8.5, 16.0])
def test_finetuned_factor_must_lie_in_one_to_max(finetuned: float) -> None:
    error = assert_rejects("finetuned_factor", RopeScaling, max_factor=8.0, finetuned_factor=finetuned)
    assert "max_factor=8.0" in str(error)


@pytest.mark.parametrize(("fast", "slow", "field"), [(1.0, 1.0, "beta_fast"), (1.0, 2.0, "beta_fast"),
                                                      (32.0, 0.0, "beta_slow"), (32.0, -1.0, "beta_slow")])
def test_betas(fast: float, slow: float, field: str) -> None:
    assert_rejects(field, RopeScaling, beta_fast=fast, beta_slow=slow)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_extrapolation_factor_in_unit_interval(value: float) -> None:
    assert_rejects("extrapolation_factor", RopeScaling, extrapolation_factor=value)


@pytest.mark.parametrize("field", ["attn_factor", "attention_factor"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_attention_factors_positive(field: str, value: float) -> None:
    assert_rejects(field, RopeScaling, **{field: value})


@pytest.mark.parametrize("reserve", [-1, 1.5, True, None])
def test_generation_reserve_non_negative_integer(reserve: object) -> None:
    assert_rejects("generation_reserve", RopeScaling, generation_reserve=reserve)


@pytest.mark.parametrize("buckets", [
    (),
    (2.0, 4.0, 8.0),            # does not start at 1
    (1.0, 2.0, 4.0),            # does not end at max_factor
    (1.0, 4.0, 2.0, 8.0),       # not increasing
    (1.0, 2.0, 2.0, 8.0),       # repeated
    (1.0, 0.5, 8.0),
    (1.0, math.nan, 8.0),
    (1.0, math.inf, 8.0),
    (1.0, "2", 8.0),
    (1.0, True, 8.0),
    (1.0, 9.0),
])
def test_bad_buckets_are_rejected(buckets: tuple) -> None:
    assert_rejects("buckets", RopeScaling, max_factor=8.0, buckets=buckets)


def test_buckets_are_normalised_to_floats_and_default_to_powers_of_two() -> None:
    assert RopeScaling(max_factor=8, buckets=[1, 2, 8]).buckets == (1.0, 2.0, 8.0)
    assert RopeScaling(max_factor=8.0).buckets == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0, 2 ** 2.5, 8.0)
    assert RopeScaling(max_factor=6.0).buckets == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0, 2 ** 2.5, 6.0)
    assert RopeScaling(max_factor=2.5).buckets == (1.0, 2 ** 0.5, 2.0, 2.5)
    assert RopeScaling(max_factor=1.2).buckets == (1.0, 1.2)
    assert RopeScaling(max_factor=1.0).buckets == (1.0,)


def test_valid_settings_are_frozen() -> None:
    scaling = RopeScaling(original_max_position=8192, max_factor=8.0)
    assert scaling.max_context == 65536 and scaling.capacity(2.5) == 20480
    with pytest.raises(AttributeError):
        scaling.max_factor = 4.0  # type: ignore[misc]


# --- RotaryConfig --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [0, 2, 3, 63, -64, 64.0, True])
def test_rotary_dim_even_integer_at_least_four(dim: object) -> None:
    assert_rejects("rotary_dim", RotaryConfig, dim)


@pytest.mark.parametrize("base", [1.0, 0.5, -1e4, math.nan, math.inf, "1e4", None])
def test_base_finite_above_one(base: object) -> None:
    assert_rejects("base", RotaryConfig, 64, base)


@pytest.mark.parametrize("partial", [0.0, 1.5, math.nan])
def test_partial_rotary_factor(partial: float) -> None:
    assert_rejects("partial_rotary_factor", RotaryConfig.from_head, 128, 1e4, partial)


def test_from_head_derives_rotary_dim_like_vllm() -> None:
    assert RotaryConfig.from_head(128, 1e4, 0.5) == RotaryConfig(64, 1e4)
    assert RotaryConfig.from_head(64, 1e5) == RotaryConfig(64, 1e5)


# --- compute_frequencies arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.5, 0.999, math.nan, math.inf, True, "2", None])
def test_factor_below_one_or_not_a_number_is_rejected(factor: object) -> None:
    assert_rejects("factor", compute_frequencies, "yarn", RotaryConfig(64), RopeScaling(max_factor=4.0), factor)


@pytest.mark.parametrize("seq_len", [-1, 10.0, True])
def test_seq_len_non_negative_integer(seq_len: object) -> None:
    assert_rejects("seq_len", compute_frequencies, "dynamic_yarn", RotaryConfig(64), RopeScaling(), 1.0, seq_len)


# --- per-request values --------------------------------------------------------------------------------

SCALING = RopeScaling(original_max_position=8192, max_factor=8.0)


@pytest.mark.parametrize("override", [0.5, 0.0, -3, 8.01, 16, math.nan, math.inf, -math.inf, True, False,
                                      "2", None, [2]])
def test_bad_override_is_rejected(override: object) -> None:
    error = assert_rejects("rope_factor", validate_override, override, SCALING)
    assert "[1, 8.0]" in str(error)


def test_override_error_uses_the_given_field_name() -> None:
    assert_rejects("extra_body.rope_factor", validate_override, 9, SCALING, field="extra_body.rope_factor")


def test_bad_override_is_rejected_by_choose_factor() -> None:
    assert_rejects("rope_factor", choose_factor, 100, None, SCALING, override=math.nan)


@pytest.mark.parametrize("override", [1, 1.0, 3, 7.5, 8])
def test_good_override_is_a_float(override: float) -> None:
    value = validate_override(override, SCALING)
    assert value == override and type(value) is float


@pytest.mark.parametrize(("prompt", "max_tokens", "field"), [
    (-1, None, "prompt_tokens"), (1.5, None, "prompt_tokens"), (True, None, "prompt_tokens"),
    (None, None, "prompt_tokens"), (10, -1, "max_tokens"), (10, 2.0, "max_tokens"), (10, False, "max_tokens"),
])
def test_token_counts_are_validated(prompt: object, max_tokens: object, field: str) -> None:
    assert_rejects(field, planned_length, prompt, max_tokens, SCALING)
    assert_rejects(field, choose_factor, prompt, max_tokens, SCALING)


# --- from_rope_parameters ------------------------------------------------------------------------------

def test_from_rope_parameters_reads_hf_and_our_keys() -> None:
    scaling = RopeScaling.from_rope_parameters({
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 16,
        "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False, "buckets": [1, 2, 4],
        "generation_reserve": 64, "finetuned_factor": 2.0, "rope_theta": 1e5,
    })
    assert (scaling.method, scaling.original_max_position, scaling.max_factor) == ("yarn", 8192, 4.0)
    assert (scaling.beta_fast, scaling.mscale, scaling.mscale_all_dim, scaling.truncate) == (16, 1.0, 0.5, False)
    assert (scaling.buckets, scaling.generation_reserve, scaling.finetuned_factor) == ((1.0, 2.0, 4.0), 64, 2.0)


def test_from_rope_parameters_falls_back_to_max_position_embeddings() -> None:
    scaling = RopeScaling.from_rope_parameters({"type": "linear", "factor": 2}, max_position_embeddings=2048)
    assert (scaling.method, scaling.original_max_position, scaling.max_factor) == ("linear", 2048, 2)
    assert_rejects("original_max_position", RopeScaling.from_rope_parameters, {"rope_type": "yarn"})
    assert_rejects("max_factor", RopeScaling.from_rope_parameters,
                   {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8})


LONGROPE = dict(method="longrope", original_max_position=4096, max_factor=32.0,
                short_factor=[1.0] * 32, long_factor=[2.0] * 32)


def test_longrope_has_two_tables_as_its_buckets() -> None:
    scaling = RopeScaling(**LONGROPE)
    assert scaling.buckets == (1.0, 32.0)
    assert scaling.short_factor == (1.0,) * 32 and scaling.long_factor == (2.0,) * 32  # tuples: hashable
    assert_rejects("buckets", RopeScaling, **LONGROPE, buckets=(1.0, 4.0, 32.0))


@pytest.mark.parametrize(("field", "bad"), [("short_factor", [1.0] * 31), ("long_factor", []),
                                            ("short_factor", [0.0] * 32), ("long_factor", [float("nan")] * 32),
                                            ("short_factor", "1.0"), ("short_mscale", 0.0), ("long_mscale", -1.0)])
def test_longrope_lists_and_magnitudes_are_checked(field: str, bad: object) -> None:
    assert_rejects("long_factor" if (field, bad) == ("short_factor", [1.0] * 31) else field, RopeScaling,
                   **{**LONGROPE, field: bad})


def test_longrope_needs_lists_of_rotary_dim_over_two() -> None:
    scaling = RopeScaling(**{**LONGROPE, "short_factor": None})
    assert_rejects("short_factor", compute_frequencies, "longrope", RotaryConfig(64), scaling, 1.0)
    compute_frequencies("longrope", RotaryConfig(64), scaling, 32.0)  # the long list is there
    assert_rejects("long_factor", compute_frequencies, "longrope", RotaryConfig(128), scaling, 32.0)


def test_from_rope_parameters_reads_longrope_as_vllm_serves_it() -> None:
    params = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "factor": 8.0,
              "short_factor": [1.0] * 48, "long_factor": [3.0] * 48, "long_mscale": 1.2}
    scaling = RopeScaling.from_rope_parameters(params, max_position_embeddings=131072)
    assert (scaling.method, scaling.max_factor, scaling.max_context) == ("longrope", 32.0, 131072)
    assert (scaling.short_mscale, scaling.long_mscale) == (None, 1.2)
    assert_rejects("max_position_embeddings", RopeScaling.from_rope_parameters, params)
