"""The ``growth`` setting of the policy: the growth modes ("recompute", the default, and "rerotate": admit at
the smallest bucket that fits the prompt and its next ``generation_reserve`` tokens, move to a larger bucket
when the request outgrows its own) against "reserve" (sized for prompt plus generation up front).
The default model's L = 8192, with buckets pinned to powers of two (1, 2, 4, 8) so the crossings read
easily; the mechanism is the same for any buckets, and the default ones are tested in test_policy.py.
"""

from __future__ import annotations

import pytest

from rope_ext import RopeConfigError, RopeScaling, choose_factor
from rope_ext.policy import bucket_for_length, factor_at, grown_factor, grows, may_outgrow

POWERS = (1.0, 2.0, 4.0, 8.0)
RESERVE = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="reserve",
                      buckets=POWERS)
GROW = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="rerotate",
                   buckets=POWERS)
PAPER = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="recompute",
                    buckets=POWERS, generation_reserve=0)


def test_default_is_recompute() -> None:
    assert RopeScaling(original_max_position=8192, max_factor=8.0).growth == "recompute"
    assert RopeScaling.from_rope_parameters({"rope_type": "dynamic_yarn", "factor": 8.0},
                                            max_position_embeddings=8192).growth == "recompute"
    assert RopeScaling.from_rope_parameters({"rope_type": "dynamic_yarn", "factor": 8.0, "growth": "rerotate"},
                                            max_position_embeddings=8192).growth == "rerotate"


@pytest.mark.parametrize("bad", ["Grow", "", "dynamic", None, 1])
def test_unknown_growth_mode_is_rejected(bad) -> None:
    with pytest.raises(RopeConfigError) as info:
        RopeScaling(original_max_position=8192, max_factor=8.0, growth=bad)
    assert info.value.field == "growth"


@pytest.mark.parametrize(("prompt", "max_tokens", "reserve", "grow", "paper"), [
    (100, None, 1.0, 1.0, 1.0),
    (7680, None, 1.0, 1.0, 1.0),    # prompt + the 512-token reserve fills L exactly
    (7681, None, 2.0, 2.0, 1.0),    # its next 512 tokens would cross L: it starts above
    (8000, 100, 1.0, 1.0, 1.0),     # it ends within L
    (8000, 4000, 2.0, 2.0, 1.0),    # it looks ahead 512 tokens only, and 8512 > L
    (7000, 4000, 2.0, 1.0, 1.0),    # 7512 fits L: it starts at 1 and grows when it gets there
    (8192, 1, 2.0, 2.0, 1.0),       # the prompt fills L exactly; one token more would cross
    (8193, 0, 2.0, 2.0, 2.0),
    (15000, 20000, 8.0, 2.0, 2.0),  # 15512 fits bucket 2 with its look-ahead
    (16000, None, 4.0, 4.0, 2.0),
    (40000, 16, 8.0, 8.0, 8.0),
])
def test_grow_admits_at_the_bucket_of_the_prompt_and_its_next_reserve_tokens(prompt, max_tokens, reserve, grow,
                                                                             paper) -> None:
    assert choose_factor(prompt, max_tokens, RESERVE) == reserve
    assert choose_factor(prompt, max_tokens, GROW) == grow
    assert choose_factor(prompt, max_tokens, PAPER) == paper  # no look-ahead: the prompt alone


def test_override_and_finetuned_floor_still_apply_under_grow() -> None:
    assert choose_factor(100, 16, GROW, override=3) == 4.0
    floored = RopeScaling(original_max_position=8192, max_factor=8.0, finetuned_factor=2.0, growth="rerotate",
                          buckets=POWERS)
    assert choose_factor(100, 16, floored) == 2.0


@pytest.mark.parametrize(("length", "at_least", "expected"), [
    (1, 1.0, 1.0), (8192, 1.0, 1.0), (8193, 1.0, 2.0), (16385, 1.0, 4.0), (70000, 1.0, 8.0),
    (100, 2.0, 2.0), (16385, 2.0, 4.0),
])
def test_bucket_for_length(length, at_least, expected) -> None:
    assert bucket_for_length(length, GROW, at_least=at_least) == expected


@pytest.mark.parametrize(("prompt", "max_tokens", "factor", "expected"), [
    (8000, 192, 1.0, False),    # 8192 fits in bucket 1
    (8000, 193, 1.0, True),
    (8000, None, 1.0, True),    # no limit: it may grow
    (30000, None, 8.0, False),  # the largest bucket: nowhere to grow
    (100, 16, 2.0, False),
])
def test_may_outgrow(prompt, max_tokens, factor, expected) -> None:
    assert may_outgrow(prompt, max_tokens, factor, GROW) is expected
    assert may_outgrow(prompt, max_tokens, factor, RESERVE) is False


@pytest.mark.parametrize(("factor", "length", "expected"), [
    (1.0, 8192, None),      # fits: stays
    (1.0, 8193, 2.0),       # one token past L: the next bucket
    (1.0, 20000, 4.0),      # straight to the bucket the length needs
    (2.0, 16385, 4.0),
    (8.0, 70000, None),     # the largest bucket: nowhere to go
])
def test_grown_factor(factor, length, expected) -> None:
    assert grown_factor(factor, length, GROW) == expected


def test_grown_factor_keeps_the_headroom() -> None:
    headroom = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="recompute",
                           buckets=POWERS, headroom=1.25)
    assert grown_factor(2.0, 16385, headroom) == 4.0
    assert grown_factor(4.0, 32769, headroom) == 8.0
    assert grown_factor(1.0, 8193, headroom) == 2.0


def test_an_override_pins_the_request() -> None:
    assert grows(GROW) and not grows(GROW, pinned=True) and not grows(RESERVE)


@pytest.mark.parametrize(("start", "length", "expected"), [
    (1.0, 8192, 1.0), (1.0, 8193, 2.0), (1.0, 16385, 4.0), (2.0, 100, 2.0), (1.0, 70000, 8.0),
])
def test_factor_at_follows_growth_token_by_token(start, length, expected) -> None:
    assert factor_at(start, length, GROW) == expected
    assert factor_at(start, length, RESERVE) == start  # reserve never grows
    assert factor_at(start, length, GROW, pinned=True) == start


def test_factor_at_is_the_chain_of_crossings_not_the_final_length() -> None:
    # With headroom, the crossing at 16385 tokens lands on 4 (1.25 x 16385 fits 32768); a request that then
    # ends at 30000 tokens stays at 4, though 1.25 x 30000 alone would need 8.
    headroom = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="recompute",
                           buckets=POWERS, headroom=1.25)
    assert factor_at(2.0, 30000, headroom) == 4.0
    assert factor_at(2.0, 32769, headroom) == 8.0
