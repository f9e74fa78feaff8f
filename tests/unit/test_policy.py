"""The per-request scale policy by example, for the default model's settings: L = 8192, served up to
s = 8 (buckets sqrt(2) apart: 1, 1.41, 2, 2.83, 4, 5.66, 8), a 512-token generation reserve when a
request gives no ``max_tokens``. The examples size a request's bucket for its planned length, i.e. ``growth="reserve"``; the growth modes
(tests/unit/test_growth_policy.py) read the prompt alone through the same rule.
"""

from __future__ import annotations

import pytest

from rope_ext import CapacityExceededError, RopeScaling, choose_factor, pinned_max_tokens, planned_length

DEFAULT = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="reserve")
R2 = 2 ** 0.5


def test_default_settings() -> None:
    assert DEFAULT.buckets == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0, 2 ** 2.5, 8.0)
    assert RopeScaling(original_max_position=8192, max_factor=8.0).growth == "recompute"
    assert DEFAULT.generation_reserve == 512
    assert DEFAULT.max_context == 65536


@pytest.mark.parametrize(("prompt", "max_tokens", "factor"), [
    (100, None, 1.0),       # short: plain RoPE
    (8000, None, R2),       # 8000 + the 512 reserve = 8512 > 8192
    (8000, 100, 1.0),       # 8100 fits in L
    (8000, 192, 1.0),       # 8192 exactly: still s = 1
    (8000, 193, R2),        # one token over L
    (11585, 0, R2),         # floor(8192 * sqrt 2) = 11585: the top of the first bucket past L
    (11586, 0, 2.0),
    (12000, 256, 2.0),      # 12256 / 8192 = 1.5
    (16384, 0, 2.0),        # exactly 2 L
    (16385, 0, 2 * R2),
    (24576, 0, 4.0),        # 3 L: past 2.83 L
    (40000, 0, 4 * R2),     # 40000 / 8192 = 4.9
    (46341, 0, 8.0),        # past floor(8192 * 5.66) = 46340
    (65536, 0, 8.0),        # the served context
    (70000, 0, 8.0),        # past it: the largest bucket (admission rejects such a request elsewhere)
    (0, 0, 1.0),
])
def test_examples(prompt: int, max_tokens: int | None, factor: float) -> None:
    assert choose_factor(prompt, max_tokens, DEFAULT) == factor


def test_planned_length_uses_the_reserve_only_without_max_tokens() -> None:
    assert planned_length(8000, None, DEFAULT) == 8512
    assert planned_length(8000, 0, DEFAULT) == 8000
    assert planned_length(8000, 100, DEFAULT) == 8100


@pytest.mark.parametrize(("override", "factor"), [(1, 1.0), (1.2, R2), (1.5, 2.0), (2, 2.0), (3, 4.0), (4.0, 4.0),
                                                  (5, 4 * R2), (8, 8.0)])
def test_override_rounds_up_to_a_bucket(override: float, factor: float) -> None:
    assert choose_factor(100, None, DEFAULT, override=override) == factor


def test_override_replaces_the_needed_scale_even_when_smaller() -> None:
    # The client's explicit choice wins; such a request does not fit its bucket and is refused
    # (pinned_max_tokens, below).
    assert choose_factor(40000, 0, DEFAULT, override=2) == 2.0


# --- a pinned request must fit its bucket (rule 5) ------------------------------------------------------

def test_a_pinned_request_past_its_bucket_is_refused_naming_the_capacity() -> None:
    """Issue 21's example: rope_factor 1 holds L = 8192 tokens; 7900 + 600 would compute 308 past it."""
    with pytest.raises(CapacityExceededError) as info:
        pinned_max_tokens(7900, 600, 1.0, DEFAULT)
    assert str(info.value) == (
        "This request's rope_factor 1 holds at most 8192 tokens; the prompt (7900 tokens) plus max_tokens (600) "
        "is 8500. Reduce the length of the prompt or max_tokens, or ask for a larger rope_factor or none.")
    assert (info.value.field, info.value.capacity) == ("max_tokens", 8192)


@pytest.mark.parametrize(("prompt", "max_tokens", "factor", "limit"), [
    (7900, 292, 1.0, 292),      # exactly L: fits
    (7900, None, 1.0, 292),     # no max_tokens: stops at the capacity
    (8191, None, 1.0, 1),
    (8192, 0, 1.0, 0),          # scoring the prompt alone (echo) fills the bucket exactly
    (100, 16, 1.0, 16),
    (11000, None, R2, 585),     # floor(8192 * sqrt 2) = 11585
    (40000, 25536, 8.0, 25536),  # the largest bucket holds the served context
])
def test_a_pinned_request_that_fits_keeps_its_max_tokens_or_stops_at_the_capacity(prompt, max_tokens, factor,
                                                                                  limit) -> None:
    assert pinned_max_tokens(prompt, max_tokens, factor, DEFAULT) == limit


@pytest.mark.parametrize(("prompt", "max_tokens", "factor", "field"), [
    (7900, 293, 1.0, "max_tokens"),   # one token past L
    (8192, None, 1.0, "prompt"),      # the prompt fills the bucket: no room for a generated token
    (9000, None, 1.0, "prompt"),
    (11000, 586, R2, "max_tokens"),
])
def test_a_pinned_request_that_does_not_fit_is_refused(prompt, max_tokens, factor, field) -> None:
    with pytest.raises(CapacityExceededError, match=f"holds at most {DEFAULT.capacity(factor)} tokens") as info:
        pinned_max_tokens(prompt, max_tokens, factor, DEFAULT)
    assert info.value.field == field
    if field == "prompt":
        assert "leaves no room for a generated token" in str(info.value)


def test_finetuned_factor_is_a_floor() -> None:
    tuned = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, finetuned_factor=2.0,
                        growth="reserve")
    assert choose_factor(100, None, tuned) == 2.0
    assert choose_factor(100, None, tuned, override=1) == 2.0
    assert choose_factor(12000, 256, tuned) == 2.0
    assert choose_factor(20000, 0, tuned) == 2 * R2
    assert choose_factor(100, None, tuned, override=3) == 4.0


def test_finetuned_factor_between_buckets_rounds_up() -> None:
    tuned = RopeScaling(original_max_position=8192, max_factor=8.0, finetuned_factor=3.0, growth="reserve")
    assert choose_factor(100, None, tuned) == 4.0


def test_custom_buckets_and_reserve() -> None:
    scaling = RopeScaling(original_max_position=4096, max_factor=6.0, buckets=(1, 1.5, 3, 6), generation_reserve=0,
                          growth="reserve")
    assert [choose_factor(n, None, scaling) for n in (4096, 4097, 6144, 6145, 12288, 12289)] == [
        1.0, 1.5, 1.5, 3.0, 3.0, 6.0]


def test_bucket_capacity_is_compared_in_tokens() -> None:
    # Regression: 1799 / 1285 rounds to 1.4, yet floor(1285 * 1.4) = 1798 (1.4 is 1.3999... in binary), so
    # the request needs the next bucket.
    scaling = RopeScaling(original_max_position=1285, max_factor=8.0, buckets=(1, 1.4, 2, 4, 8),
                          generation_reserve=0, growth="reserve")
    assert scaling.capacity(1.4) == 1798
    assert choose_factor(1798, None, scaling) == 1.4
    assert choose_factor(1799, None, scaling) == 2.0


def test_decision_depends_only_on_the_request() -> None:
    # Same request, same settings, same answer, whatever was asked before (no hidden grow-only state).
    first = choose_factor(100, None, DEFAULT)
    choose_factor(60000, 0, DEFAULT)
    assert choose_factor(100, None, DEFAULT) == first == 1.0


HEADROOM = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, headroom=1.25,
                       growth="reserve")


@pytest.mark.parametrize(("prompt", "max_tokens", "factor"), [
    (8000, 192, 1.0),       # 8192 = L: at or below L headroom changes nothing (exact, scale 1)
    (8000, 193, R2),        # 8193 x 1.25 = 10242 fits 1.41 (11585)
    (9268, 0, R2),          # ceil(9268 x 1.25) = 11585 fits 1.41 exactly
    (9269, 0, 2.0),         # 11587 does not
    (13107, 0, 2.0),        # ceil(13107 x 1.25) = 16384 fits 2 exactly
    (13108, 0, 2 * R2),     # 16385 does not
    (16384, 0, 2 * R2),     # the top of bucket 2 runs one bucket up
    (52428, 0, 8.0),
    (60000, 0, 8.0),        # nothing larger: the largest bucket
])
def test_headroom_sizes_buckets_past_l_for_more_than_the_length(prompt, max_tokens, factor) -> None:
    assert choose_factor(prompt, max_tokens, HEADROOM) == factor


def test_headroom_must_be_at_least_one() -> None:
    from rope_ext import RopeConfigError

    with pytest.raises(RopeConfigError) as info:
        RopeScaling(original_max_position=8192, max_factor=8.0, headroom=0.9)
    assert info.value.field == "headroom"
    assert RopeScaling.from_rope_parameters({"rope_type": "dynamic_yarn", "factor": 8.0, "headroom": 1.25},
                                            max_position_embeddings=8192).headroom == 1.25
