"""Admission in the engine core: the factor chosen, recorded and salted on real vLLM request objects.

No engine runs here: ``admit`` is applied to ``EngineCoreRequest``/``SamplingParams`` exactly as the
patched ``EngineCore.preprocess_add_request`` applies it, before the request's blocks are hashed.
"""

from __future__ import annotations

import time
import types

import pytest

from rope_ext import RopeScaling
from rope_ext.policy import requested_max_tokens
from rope_ext.vllm_plugin.admission import admit, private_salt, salt_for
from rope_ext.vllm_plugin.config import scaling_from_rope_parameters

pytest.importorskip("vllm")

L = 8192
SCALING = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, growth="reserve")
MAX_MODEL_LEN = SCALING.max_context
R2 = 2 ** 0.5  # the default buckets: 1, 1.41, 2, 2.83, 4, 5.66, 8


def _request(prompt_len: int, max_tokens: int | None, extra_args=None, cache_salt=None):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(
        request_id="r", prompt_token_ids=[1] * prompt_len, mm_features=None,
        sampling_params=SamplingParams(max_tokens=max_tokens, extra_args=extra_args), pooling_params=None,
        arrival_time=time.time(), lora_request=None, cache_salt=cache_salt, data_parallel_rank=None)


@pytest.mark.parametrize("prompt_len,max_tokens,expected", [
    (100, 16, 1.0),
    (8000, 100, 1.0),
    (8100, 92, 1.0),        # exactly L
    (8100, 93, R2),         # one token past L: the first bucket past it, sqrt(2)
    (12000, 256, 2.0),
    (40000, 16, 4 * R2),
    (50000, 16, 8.0),
    (8000, None, R2),       # unset: the 512-token reserve counts
    (8000, MAX_MODEL_LEN - 8000, R2),  # vLLM's fill-in of an unset max_tokens reads as unset
    (100, MAX_MODEL_LEN - 100, 1.0),
])
def test_factor_follows_the_policy(prompt_len, max_tokens, expected):
    request = _request(prompt_len, max_tokens)
    state = admit(request, SCALING, MAX_MODEL_LEN)
    assert state.factor == state.start == expected
    assert not state.pinned and not state.growable  # reserve: sized up front, never grows
    assert request.sampling_params.extra_args["rope_factor"] == expected


def test_override_is_rounded_up_to_a_bucket_pins_and_keeps_other_extra_args():
    request = _request(100, 16, extra_args={"rope_factor": 3, "other": "kept"})
    state = admit(request, RECOMPUTE, MAX_MODEL_LEN)
    assert state.factor == 4.0 and state.pinned and not state.growable
    assert request.sampling_params.extra_args["other"] == "kept"


@pytest.mark.parametrize("bad", [0.5, 9, "2", float("nan"), True, [2]])
def test_invalid_override_fails_the_request_in_the_engine_core(bad):
    from rope_ext import RopeConfigError

    with pytest.raises(RopeConfigError, match=r"rope_factor: must be a number in \[1, 8.0\]"):
        admit(_request(100, 16, extra_args={"rope_factor": bad}), SCALING, MAX_MODEL_LEN)


RECOMPUTE = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, growth="recompute")
REROTATE = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, growth="rerotate")


@pytest.mark.parametrize("prompt_len,max_tokens,factor,growable", [
    (100, 16, 1.0, False),                   # fits its bucket whatever it generates
    (100, None, 1.0, True),                  # no limit: may cross L
    (7000, 1500, 1.0, True),                 # 8500 > L, but 7000 + its 512-token look-ahead fits
    (7000, MAX_MODEL_LEN - 7000, 1.0, True),  # vLLM's fill-in reads as unset
    (8000, 500, R2, False),                  # it would cross L within its look-ahead: it starts above
    (12000, 256, 2.0, False),
    (60000, None, 8.0, False),               # the largest bucket: nowhere to grow
])
def test_growth_admits_at_the_bucket_of_the_prompt_and_its_look_ahead(prompt_len, max_tokens, factor, growable):
    request = _request(prompt_len, max_tokens, cache_salt="user")
    state = admit(request, RECOMPUTE, MAX_MODEL_LEN)
    assert (state.factor, state.growable, state.client_salt) == (factor, growable, "user")
    # recompute shares blocks per scale, growable or not: a shared system prompt still hits the cache
    assert request.cache_salt == salt_for("user", factor)


def test_rerotate_gives_a_request_that_may_grow_a_salt_of_its_own():
    grows, fixed = _request(100, None, cache_salt="user"), _request(100, 16, cache_salt="user")
    assert admit(grows, REROTATE, MAX_MODEL_LEN).growable and not admit(fixed, REROTATE, MAX_MODEL_LEN).growable
    assert grows.cache_salt.startswith("user|ropeserve-rerotate=") and grows.cache_salt != private_salt("user")
    assert fixed.cache_salt == "user"


@pytest.fixture
def front_end(monkeypatch):
    """vLLM's ``InputProcessor.process_inputs`` with the plugin's hook, over a stand-in that returns
    ``_request(*args, **kwargs)`` as vLLM would build it; call ``front_end(scaling, *args, **kwargs)``."""
    from vllm.v1.engine.input_processor import InputProcessor

    from rope_ext.vllm_plugin import admission

    monkeypatch.setattr(InputProcessor, "process_inputs", lambda self, *a, **k: _request(*a, **k))
    admission.patch_input_processor()

    class Processor(InputProcessor):
        def __init__(self, scaling):
            self._ropeserve_scaling = scaling
            self.model_config = types.SimpleNamespace(max_model_len=MAX_MODEL_LEN)

    return lambda scaling, *args, **kwargs: Processor(scaling).process_inputs(*args, **kwargs)


def test_front_end_refuses_a_bad_override_with_a_400(front_end):
    """The front-end validates with the engine core's own rule; the engine core decides."""
    from vllm.exceptions import VLLMClientError

    assert front_end(SCALING, 100, 16, extra_args={"rope_factor": 2}).sampling_params.extra_args == {"rope_factor": 2}
    with pytest.raises(VLLMClientError, match="rope_factor"):
        front_end(SCALING, 100, 16, extra_args={"rope_factor": 9})


def test_a_pinned_request_past_its_bucket_is_a_400_in_the_front_end_and_fails_in_the_engine_core(front_end):
    """Issue 21: rope_factor 1 holds L = 8192 tokens; the message is the policy's, as the gateway's."""
    from vllm.exceptions import VLLMValidationError

    from rope_ext import CapacityExceededError

    message = ("This request's rope_factor 1 holds at most 8192 tokens; the prompt (7900 tokens) plus max_tokens "
               "(600) is 8500. Reduce the length of the prompt or max_tokens, or ask for a larger rope_factor or none.")
    with pytest.raises(VLLMValidationError) as info:
        front_end(RECOMPUTE, 7900, 600, extra_args={"rope_factor": 1})
    assert str(info.value) == f"{message} (parameter=max_tokens)" and info.value.parameter == "max_tokens"
    request = _request(7900, 600, extra_args={"rope_factor": 1}, cache_salt="user")
    with pytest.raises(CapacityExceededError) as refused:
        admit(request, RECOMPUTE, MAX_MODEL_LEN)  # a request that came to the engine core directly
    assert str(refused.value) == message
    assert request.cache_salt == "user" and request.sampling_params.extra_args == {"rope_factor": 1}  # untouched


@pytest.mark.parametrize("max_tokens", [None, MAX_MODEL_LEN - 7900])  # vLLM's fill-in reads as unset
def test_a_pinned_request_without_max_tokens_is_capped_at_its_bucket(front_end, max_tokens):
    request = front_end(RECOMPUTE, 7900, max_tokens, extra_args={"rope_factor": 1})
    assert request.sampling_params.max_tokens == 292  # 8192 in all: it finishes with reason length there
    state = admit(request, RECOMPUTE, MAX_MODEL_LEN)  # the engine core agrees, and changes nothing
    assert (state.factor, state.pinned, request.sampling_params.max_tokens) == (1.0, True, 292)
    direct = _request(7900, max_tokens, extra_args={"rope_factor": 1})  # straight to the engine core
    admit(direct, RECOMPUTE, MAX_MODEL_LEN)
    assert direct.sampling_params.max_tokens == 292
    kept = front_end(RECOMPUTE, 7900, 100, extra_args={"rope_factor": 1})
    assert kept.sampling_params.max_tokens == 100


def test_cache_salt_separates_scales_and_keeps_the_clients_salt():
    assert salt_for(None, 1.0) is None
    assert salt_for("user", 1.0) == "user"
    assert salt_for(None, 2.0) != salt_for(None, 4.0)
    assert "user" in salt_for("user", 2.0)
    request = _request(12000, 16, cache_salt="user")
    assert admit(request, SCALING, MAX_MODEL_LEN).client_salt == "user"
    assert request.cache_salt == salt_for("user", 2.0)


def test_requested_max_tokens():
    assert requested_max_tokens(100, None, 1000) is None
    assert requested_max_tokens(100, 900, 1000) is None
    assert requested_max_tokens(100, 899, 1000) == 899


def test_which_models_the_plugin_acts_on(monkeypatch):
    monkeypatch.delenv("ROPESERVE_DYNAMIC_ROPE", raising=False)
    assert scaling_from_rope_parameters(None, 8192) is None
    assert scaling_from_rope_parameters({"rope_type": "default", "rope_theta": 1e4}, 8192) is None
    qwen = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    assert scaling_from_rope_parameters(qwen, 32768) is None
    monkeypatch.setenv("ROPESERVE_DYNAMIC_ROPE", "1")
    switched = scaling_from_rope_parameters(qwen, 32768)
    assert (switched.method, switched.max_factor, switched.original_max_position) == ("dynamic_yarn", 4.0, 32768)
    ours = scaling_from_rope_parameters({"rope_type": "dynamic_ntk", "factor": 4.0, "buckets": [1, 2, 4],
                                         "generation_reserve": 64}, 4096)
    assert (ours.method, ours.buckets, ours.generation_reserve, ours.original_max_position) == (
        "dynamic_ntk", (1.0, 2.0, 4.0), 64, 4096)


def test_invalid_plugin_settings_name_the_field():
    from rope_ext import RopeConfigError

    with pytest.raises(RopeConfigError, match="max_factor"):
        scaling_from_rope_parameters({"rope_type": "dynamic_yarn", "factor": 0.5}, 8192)
    with pytest.raises(RopeConfigError, match="finetuned_factor"):
        scaling_from_rope_parameters({"rope_type": "dynamic_yarn", "factor": 4.0, "finetuned_factor": 8}, 8192)


def test_gateway_and_engine_can_never_disagree(front_end):
    """The gateway answers x-rope-factor before the engine does, with the same policy call; the engine sees
    the request as vLLM hands it over (a missing max_tokens filled with the rest of the context), through
    its front-end and then its engine core. Over every growth mode, bucket list, length, limit and
    override, both choose the same factor; a pinned request is refused by both with the same message, or
    run by both with the same max_tokens (rule 5)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from vllm.exceptions import VLLMValidationError

    from server.admission import admit as gateway_admit
    from server.errors import ContextLengthExceeded

    modes = st.sampled_from(["recompute", "reserve", "rerotate"])
    bucket_lists = st.sampled_from([None, (1.0, 1.5, 3.0, 8.0), (1.0, 2 ** 0.5, 2.0, 4.0, 8.0)])
    headrooms = st.sampled_from([1.0, 1.25])

    @settings(max_examples=300, deadline=None)
    @given(growth=modes, buckets=bucket_lists, headroom=headrooms, prompt=st.integers(1, MAX_MODEL_LEN - 1),
           limit=st.one_of(st.none(), st.integers(1, MAX_MODEL_LEN)),
           override=st.one_of(st.none(), st.floats(1.0, 8.0, allow_nan=False)))
    def check(growth, buckets, headroom, prompt, limit, override):
        scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, buckets=buckets,
                              growth=growth, headroom=headroom)
        if limit is not None and prompt + limit > MAX_MODEL_LEN:
            limit = MAX_MODEL_LEN - prompt or None  # the gateway refuses the rest (context length, a 400)
        filled = limit if limit is not None else MAX_MODEL_LEN - prompt  # what vLLM passes the engine core
        extra_args = None if override is None else {"rope_factor": override}
        try:
            gateway = gateway_admit(prompt, limit, scaling, override=override)
        except ContextLengthExceeded as refused:
            with pytest.raises(VLLMValidationError) as info:
                front_end(scaling, prompt, filled, extra_args=extra_args)
            assert str(info.value.__cause__) == refused.message
            return
        request = front_end(scaling, prompt, filled, extra_args=extra_args)
        assert admit(request, scaling, MAX_MODEL_LEN).factor == gateway.factor
        ran = request.sampling_params.max_tokens
        assert ran == (filled if gateway.pinned_limit is None else gateway.pinned_limit)

    check()
