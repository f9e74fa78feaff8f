"""Admission: the context check and the factor, as pure functions (no HTTP)."""

from __future__ import annotations

import pytest

from rope_ext import RopeConfigError, RopeScaling, choose_factor
from server.admission import admit, final_factor, resolve_override
from server.errors import ContextLengthExceeded, InvalidRequest

SCALING = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="reserve")
GROWING = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0)  # the default
R2 = 2 ** 0.5  # the default buckets: 1, 1.41, 2, 2.83, 4, 5.66, 8


@pytest.mark.parametrize("prompt", [0, 1, 7680, 7681, 8192, 12000, 16384, 30000, 40000, 65000])
@pytest.mark.parametrize("max_tokens", [None, 0, 16, 512])
def test_factor_is_the_policy_choice(prompt: int, max_tokens: int | None) -> None:
    if max_tokens is not None and prompt + max_tokens > SCALING.max_context:
        pytest.skip("over the context; covered below")
    admission = admit(prompt, max_tokens, SCALING)
    assert admission.factor == choose_factor(prompt, max_tokens, SCALING)
    assert admission.prompt_tokens == prompt and admission.max_tokens == max_tokens


def test_examples_of_the_policy() -> None:
    assert admit(100, 100, SCALING).factor == 1.0
    assert admit(8000, 192, SCALING).factor == 1.0   # exactly L: plain RoPE
    assert admit(8000, 193, SCALING).factor == R2    # past L: the first bucket, sqrt(2)
    assert admit(8000, None, SCALING).factor == R2   # the 512-token reserve makes it longer than L
    assert admit(12000, 256, SCALING).factor == 2.0
    assert admit(20000, 16, SCALING).factor == 2 * R2
    assert admit(65536, 0, SCALING).factor == 8.0


def test_the_default_growth_starts_a_request_at_the_bucket_of_its_prompt_and_its_look_ahead() -> None:
    assert admit(7680, None, GROWING).factor == 1.0   # prompt + the 512-token reserve fills L
    assert admit(7681, None, GROWING).factor == R2    # its next 512 tokens would cross L
    assert admit(7000, 4000, GROWING).factor == 1.0   # it grows when it crosses L, not before
    assert admit(8000, 192, GROWING).factor == 1.0    # it ends within L
    assert admit(12000, 256, GROWING).factor == 2.0
    assert final_factor(admit(7000, None, GROWING), 7000, 1194, GROWING) == R2  # 8193 tokens computed
    assert final_factor(admit(7000, None, GROWING), 7000, 1193, GROWING) == 1.0  # its last token is never fed
    assert final_factor(admit(8000, 193, SCALING), 8000, 193, SCALING) == R2   # reserve: as it started


def test_prompt_over_the_context_is_refused() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        admit(65537, None, SCALING, prompt_param="messages")
    assert info.value.param == "messages" and info.value.code == "context_length_exceeded"
    assert "65536" in info.value.message and "65537" in info.value.message


def test_prompt_plus_max_tokens_over_the_context_is_refused() -> None:
    admit(65000, 536, SCALING)  # exactly the context: fine
    with pytest.raises(ContextLengthExceeded) as info:
        admit(65000, 537, SCALING)
    assert info.value.param == "max_tokens" and info.value.status_code == 400


def test_override_is_rounded_up_to_a_bucket_and_validated() -> None:
    assert admit(100, 10, SCALING, override=3).factor == 4.0
    assert admit(3000, 10, SCALING, override=1).factor == 1.0
    assert admit(3000, 10, SCALING, override=4).factor == 4.0  # the client's choice, even when larger
    for bad in (0.5, 9, float("nan"), "2", True):
        with pytest.raises(RopeConfigError) as info:
            admit(100, 10, SCALING, override=bad)
        assert info.value.field == "rope_factor"


def test_a_pinned_request_past_its_bucket_is_refused() -> None:
    """Issue 21: rope_factor 1 holds L = 8192 tokens, whatever the growth mode (a pinned request never grows)."""
    for scaling in (SCALING, GROWING):
        with pytest.raises(ContextLengthExceeded) as info:
            admit(7900, 600, scaling, override=1)
        assert info.value.message == (
            "This request's rope_factor 1 holds at most 8192 tokens; the prompt (7900 tokens) plus max_tokens "
            "(600) is 8500. Reduce the length of the prompt or max_tokens, or ask for a larger rope_factor or "
            "none.")
        assert (info.value.param, info.value.code, info.value.status_code) == (
            "max_tokens", "context_length_exceeded", 400)
        assert admit(7900, 600, scaling).factor in (1.0, R2)  # not pinned: the policy's bucket holds it
    with pytest.raises(ContextLengthExceeded, match="leaves no room") as info:
        admit(30000, None, SCALING, override=1, prompt_param="messages")
    assert info.value.param == "messages"
    with pytest.raises(ContextLengthExceeded, match="holds at most 16384 tokens"):
        admit(16000, 400, SCALING, override=1.5)  # rounded up to the bucket 2


def test_a_pinned_request_without_max_tokens_stops_at_its_bucket() -> None:
    assert admit(7900, None, GROWING, override=1).pinned_limit == 292  # the engine caps it: 8192 in all
    assert admit(7900, 65536 - 7900, GROWING, override=1).pinned_limit == 292  # vLLM's fill-in: unset
    assert admit(7900, 292, GROWING, override=1).pinned_limit == 292
    assert admit(7900, None, GROWING, override=2).pinned_limit == 16384 - 7900
    assert admit(7900, None, GROWING).pinned_limit is None  # not pinned: it grows instead


def test_rope_method() -> None:
    assert resolve_override(None, None, None, SCALING) is None
    assert resolve_override(None, "dynamic_yarn", None, SCALING) is None
    assert resolve_override(2.0, "dynamic_yarn", None, SCALING) == 2.0
    assert resolve_override(None, "default", None, SCALING) == 1.0
    assert resolve_override(1, "default", None, SCALING) == 1.0
    with pytest.raises(InvalidRequest, match="means factor 1"):
        resolve_override(2.0, "default", None, SCALING)
    with pytest.raises(InvalidRequest, match="not served here") as info:
        resolve_override(None, "yarn", None, SCALING)
    assert info.value.param == "rope_method"


def test_plain_rope_is_refused_for_a_finetuned_model() -> None:
    finetuned = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0,
                            finetuned_factor=2.0)
    with pytest.raises(InvalidRequest, match="fine-tuned"):
        resolve_override(None, "default", None, finetuned)
    assert admit(100, 10, finetuned).factor == 2.0  # the floor


def test_vllm_xargs_factor_counts_as_an_override() -> None:
    assert resolve_override(None, None, 4, SCALING) == 4
    assert resolve_override(4, None, 4, SCALING) == 4
    with pytest.raises(InvalidRequest, match="disagree"):
        resolve_override(2, None, 4, SCALING)


def test_the_factor_header_is_short_and_exact() -> None:
    from rope_ext import format_factor

    assert [format_factor(f) for f in (1.0, 2.0, 1.5, 8.0)] == ["1", "2", "1.5", "8"]
    assert all(float(format_factor(f)) == f for f in GROWING.buckets)  # sqrt(2) is not rounded to 1.41421
