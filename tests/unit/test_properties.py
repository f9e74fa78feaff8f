"""Property tests (hypothesis) of rope_ext: identity at s = 1, positive finite frequencies for every
method, and the scale policy's guarantees (a bucket, never below the fine-tuned floor, monotone in the
request's length, a bucket large enough for the planned length; a pinned request never holds more than its
bucket's capacity).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rope_ext import (
    METHODS,
    CapacityExceededError,
    RopeScaling,
    RotaryConfig,
    bucket_frequencies,
    choose_factor,
    compute_frequencies,
    cos_sin_rows,
    pinned_max_tokens,
    planned_length,
)

rotary_dims = st.integers(2, 128).map(lambda half: 2 * half)  # d >= 4, as RotaryConfig requires
bases = st.floats(2.0, 1e9)
contexts = st.integers(1, 1 << 20)
# LongRoPE takes lists sized by the rotary dim and exactly two buckets: its own tests (test_oracle.py,
# test_transformers_parity.py, test_vllm_parity.py) cover it; the properties here are the scale family's.
methods = st.sampled_from(sorted(set(METHODS) - {"longrope"}))
factors = st.floats(1.0, 1000.0)
tokens = st.integers(0, 1 << 22)

# Modest example counts keep the unit tier fast on two cores; no deadline, as the first example of a
# test pays torch's warm-up.
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scalings(draw: st.DrawFn, method: st.SearchStrategy[str] = methods) -> RopeScaling:
    """A valid RopeScaling: default or custom buckets (arbitrary floats and one-decimal values such as
    1.4, which exercise rounding in ``L * s``), an optional fine-tuned floor, a generation reserve."""
    L = draw(contexts)
    max_factor = draw(st.one_of(st.floats(1.0, 64.0), st.integers(10, 640).map(lambda k: k / 10)))
    buckets = None
    if max_factor > 1 and draw(st.booleans()):
        inner = draw(st.lists(st.one_of(st.floats(1.0, max_factor),
                                        st.integers(11, 640).map(lambda k: k / 10)), max_size=6))
        buckets = (1.0, *sorted({b for b in inner if 1 < b < max_factor}), max_factor)
    finetuned = draw(st.one_of(st.just(1.0), st.floats(1.0, max_factor)))
    return RopeScaling(method=draw(method), original_max_position=L, max_factor=max_factor, buckets=buckets,
                       finetuned_factor=finetuned, generation_reserve=draw(st.integers(0, 4096)),
                       truncate=draw(st.booleans()))


def plain_inv_freq(rotary: RotaryConfig) -> torch.Tensor:
    """Unscaled RoPE as vLLM and transformers compute it."""
    d = rotary.rotary_dim
    return 1.0 / (rotary.base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


# --- frequencies ---------------------------------------------------------------------------------------

@FAST
@given(d=rotary_dims, base=bases, scaling=scalings())
def test_bucket_one_is_exactly_plain_rope(d: int, base: float, scaling: RopeScaling) -> None:
    rotary = RotaryConfig(d, base)
    inv_freq, attention = bucket_frequencies(rotary, scaling, 1.0)
    assert torch.equal(inv_freq, plain_inv_freq(rotary))
    assert attention == 1.0 and type(attention) is float
    rows = cos_sin_rows((inv_freq, attention), 64)
    freqs = torch.outer(torch.arange(64, dtype=torch.float32), plain_inv_freq(rotary))
    assert torch.equal(rows, torch.cat((freqs.cos(), freqs.sin()), dim=-1))


@FAST
@given(d=rotary_dims, base=bases, L=contexts,
       method=st.sampled_from(["dynamic_ntk", "dynamic_linear", "dynamic_yarn"]), data=st.data())
def test_dynamic_methods_at_or_below_L_are_plain_rope(d: int, base: float, L: int, method: str,
                                                      data: st.DataObject) -> None:
    seq_len = data.draw(st.integers(0, L), label="seq_len")
    rotary = RotaryConfig(d, base)
    scaling = RopeScaling(method=method, original_max_position=L)
    inv_freq, attention = compute_frequencies(method, rotary, scaling, 1.0, seq_len=seq_len)
    assert attention == 1.0
    if method == "dynamic_yarn":
        # YaRN's blend at s = 1 mixes two equal tensors and may round by an ulp; the tables avoid it by
        # serving bucket 1 with plain RoPE (test above).
        torch.testing.assert_close(inv_freq, plain_inv_freq(rotary), rtol=1e-6, atol=0)
    else:
        assert torch.equal(inv_freq, plain_inv_freq(rotary))


@FAST
@given(d=rotary_dims, base=bases, scaling=scalings(), factor=factors,
       seq_len=st.one_of(st.none(), st.integers(0, 1 << 24)))
def test_frequencies_are_positive_and_finite(d: int, base: float, scaling: RopeScaling, factor: float,
                                             seq_len: int | None) -> None:
    inv_freq, attention = compute_frequencies(scaling.method, RotaryConfig(d, base), scaling, factor, seq_len)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (d // 2,)
    assert torch.isfinite(inv_freq).all() and (inv_freq > 0).all()
    # A positive inverse frequency for pair 1 means a positive effective base: b_eff = inv_freq_1^(-d/2).
    assert math.isfinite(attention) and attention > 0
    # No scaling method speeds a rotation up: every frequency is at most plain RoPE's (plus float32 rounding).
    assert (inv_freq <= plain_inv_freq(RotaryConfig(d, base)) * (1 + 1e-6)).all()


@FAST
@given(d=rotary_dims, base=bases, scaling=scalings(), factor=factors)
def test_frequencies_do_not_increase_with_the_scale(d: int, base: float, scaling: RopeScaling,
                                                    factor: float) -> None:
    rotary = RotaryConfig(d, base)
    low = compute_frequencies(scaling.method, rotary, scaling, factor).inv_freq
    high = compute_frequencies(scaling.method, rotary, scaling, factor * 2).inv_freq
    assert (high <= low * (1 + 1e-6)).all()


# --- the scale policy ----------------------------------------------------------------------------------

requests = st.tuples(tokens, st.one_of(st.none(), tokens))


@FAST
@given(scaling=scalings(), request=requests)
def test_factor_is_a_bucket_at_or_above_the_finetuned_floor(scaling: RopeScaling,
                                                            request: tuple[int, int | None]) -> None:
    factor = choose_factor(*request, scaling)
    assert factor in scaling.buckets
    assert factor >= scaling.finetuned_factor


@FAST
@given(scaling=scalings(), request=requests)
# 1799 / 1285 rounds to the bucket 1.4, whose capacity floor(1285 * 1.4) is 1798 (a fixed bug).
@example(scaling=RopeScaling(original_max_position=1285, max_factor=8.0, buckets=(1, 1.4, 2, 4, 8),
                             generation_reserve=0), request=(1799, None))
def test_bucket_holds_the_planned_length(scaling: RopeScaling, request: tuple[int, int | None]) -> None:
    # reserve sizes the bucket for the planned length; the growth modes for the prompt and at most the
    # generation reserve of it (the look-ahead)
    planned = planned_length(*request, scaling)
    if scaling.growth != "reserve":
        planned = min(planned, request[0] + scaling.generation_reserve)
    factor = choose_factor(*request, scaling)
    if planned <= scaling.max_context:
        assert planned <= scaling.capacity(factor)
        # ...and it is the smallest such bucket at or above the floor.
        smaller = [b for b in scaling.buckets if scaling.finetuned_factor <= b < factor]
        assert all(scaling.capacity(b) < planned for b in smaller)
    else:
        assert factor == scaling.buckets[-1]
    if planned <= scaling.original_max_position and scaling.finetuned_factor == 1:
        assert factor == 1.0


@FAST
@given(scaling=scalings(), prompts=st.tuples(tokens, tokens), max_tokens=st.one_of(st.none(), tokens))
def test_factor_is_monotone_in_prompt_length(scaling: RopeScaling, prompts: tuple[int, int],
                                             max_tokens: int | None) -> None:
    short, long = sorted(prompts)
    assert choose_factor(short, max_tokens, scaling) <= choose_factor(long, max_tokens, scaling)


@FAST
@given(scaling=scalings(), prompt=tokens, budgets=st.tuples(tokens, tokens))
def test_factor_is_monotone_in_max_tokens(scaling: RopeScaling, prompt: int, budgets: tuple[int, int]) -> None:
    small, large = sorted(budgets)
    assert choose_factor(prompt, small, scaling) <= choose_factor(prompt, large, scaling)


@FAST
@given(scaling=scalings(), request=requests, data=st.data())
def test_override_picks_the_smallest_bucket_at_or_above_it(scaling: RopeScaling,
                                                           request: tuple[int, int | None],
                                                           data: st.DataObject) -> None:
    override = data.draw(st.floats(1.0, scaling.max_factor))
    factor = choose_factor(*request, scaling, override=override)
    floor = max(override, scaling.finetuned_factor)
    assert factor == min(b for b in scaling.buckets if b >= floor)


@FAST
@given(scaling=scalings(), request=requests, data=st.data())
def test_a_pinned_request_never_holds_more_than_its_bucket(scaling: RopeScaling, request: tuple[int, int | None],
                                                           data: st.DataObject) -> None:
    """It runs with its own max_tokens when that fits, else up to the capacity when it set none, else it is
    refused; and a request that fits a bucket fits every larger one."""
    prompt, max_tokens = request
    factor = data.draw(st.sampled_from(scaling.buckets))
    capacity = scaling.capacity(factor)
    try:
        limit = pinned_max_tokens(prompt, max_tokens, factor, scaling)
    except CapacityExceededError as exc:
        assert exc.capacity == capacity and f"holds at most {capacity} tokens" in str(exc)
        assert prompt + (1 if max_tokens is None else max_tokens) > capacity
        return
    assert prompt + limit <= capacity
    assert limit == (capacity - prompt if max_tokens is None else max_tokens)
    assert max_tokens is not None or limit >= 1
    for larger in (b for b in scaling.buckets if b > factor):
        assert pinned_max_tokens(prompt, max_tokens, larger, scaling) >= limit
