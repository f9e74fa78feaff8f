"""The scheduler side of the plugin (rope_ext.vllm_plugin.scheduler) on real vLLM ``Request`` objects.

No engine runs: the scheduler stands in as the few attributes the hooks read (``running``, ``waiting``,
``requests``, ``_preempt_request``), and ``_preempt_request`` does what vLLM's does to the request
(blocks released, back to waiting, ``num_computed_tokens`` 0). What is checked: who grows and to which
bucket; that a grown request's cache is re-salted for its new scale and its block hashes recomputed
(so it can share blocks with other requests at that scale and never with its old ones); pinned requests
never grow; each step tells the workers the factors they do not know yet, and counts tokens per factor.
The real engine runs the same code in tests/plugin/test_engine_growth.py.
"""

from __future__ import annotations

import types

import pytest

from rope_ext import RopeScaling

pytest.importorskip("vllm")

L = 1024
BLOCK = 16


@pytest.fixture(scope="module")
def hasher():
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256_cbor)
    return get_request_block_hasher(BLOCK, sha256_cbor)


def _scaling(growth: str) -> RopeScaling:
    # no look-ahead (the paper's rule): a request starts at the bucket of its prompt, so a test places each
    # crossing by its prompt length alone (the look-ahead is admission's, tested in test_admission_unit.py);
    # buckets pinned to powers of two so the crossings read easily (the mechanism is the same for any)
    return RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, growth=growth,
                       generation_reserve=0, buckets=(1, 2, 4, 8))


def _request(hasher, scaling, prompt_len, *, output=0, computed=None, override=None, salt=None, req_id="r",
             tokens=None):
    """A request admitted as the engine core admits it, with ``output`` tokens generated so far."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.request import Request, RequestStatus

    from rope_ext.vllm_plugin.admission import admit

    core = EngineCoreRequest(
        request_id=req_id, prompt_token_ids=list(range(prompt_len)) if tokens is None else tokens, mm_features=None,
        sampling_params=SamplingParams(max_tokens=scaling.max_context - prompt_len,  # as vLLM fills it
                                       extra_args=None if override is None else
                                       {"rope_factor": override}),
        pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=salt, data_parallel_rank=None)
    state = admit(core, scaling, scaling.max_context)
    request = Request.from_engine_core_request(core, hasher)
    request.ropeserve = state
    request.append_output_token_ids(list(range(output)))
    request.num_computed_tokens = prompt_len + output - 1 if computed is None else computed
    request.status = RequestStatus.RUNNING
    return request


class FakeScheduler:
    def __init__(self, running, waiting=()):
        self.running, self.waiting = list(running), list(waiting)
        self.requests = {r.request_id: r for r in [*running, *waiting]}
        self.preempted = []

    def _preempt_request(self, request, timestamp):
        from vllm.v1.request import RequestStatus

        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.insert(0, request)
        self.preempted.append(request.request_id)

    def _free_request_blocks(self, request):
        self.preempted.append(f"freed {request.request_id}")


def _state(scaling):
    from rope_ext.vllm_plugin.admission import EngineRope
    from rope_ext.vllm_plugin.scheduler import SchedulerRope

    return SchedulerRope(EngineRope(scaling, scaling.max_context))


@pytest.fixture(autouse=True)
def _metrics_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPESERVE_METRICS_DIR", str(tmp_path))


def test_recompute_preempts_the_request_a_step_takes_past_its_bucket(hasher):
    from rope_ext.vllm_plugin.admission import salt_for

    scaling = _scaling("recompute")
    crosses = _request(hasher, scaling, 1000, output=25, req_id="crosses", salt="user")  # 1025 > 1024
    fits = _request(hasher, scaling, 1000, output=24, req_id="fits")                      # 1024: still fits
    hashes_at_1 = list(crosses.block_hashes)
    scheduler = FakeScheduler([crosses, fits])
    state = _state(scaling)
    state.grow(scheduler)
    assert scheduler.preempted == ["crosses"] and scheduler.running == [fits]
    assert crosses.ropeserve.factor == 2.0 and crosses.ropeserve.start == 1.0 and fits.ropeserve.factor == 1.0
    # re-salted for its new scale, every full block re-hashed: it shares blocks with requests at 2 only
    assert crosses.cache_salt == salt_for("user", 2.0)
    assert len(crosses.block_hashes) == len(hashes_at_1) == 1025 // BLOCK
    assert not set(crosses.block_hashes) & set(hashes_at_1)
    at_2 = _request(hasher, scaling, 1025, override=2, salt="user", tokens=list(crosses.all_token_ids))
    assert crosses.block_hashes == at_2.block_hashes


def test_growth_goes_straight_to_the_bucket_the_length_needs_and_stops_at_the_largest(hasher):
    scaling = _scaling("recompute")
    jumps = _request(hasher, scaling, 1000, output=3000, computed=1000, req_id="jumps")  # a long chunk ahead
    largest = _request(hasher, scaling, 8000, output=500, req_id="largest")
    scheduler = FakeScheduler([jumps, largest])
    _state(scaling).grow(scheduler)
    assert jumps.ropeserve.factor == 4.0 and largest.ropeserve.factor == 8.0
    assert scheduler.preempted == ["jumps"]


def test_pinned_and_reserved_requests_never_grow(hasher):
    pinned = _request(hasher, _scaling("recompute"), 1000, output=100, override=1, req_id="pinned")
    reserved = _request(hasher, _scaling("reserve"), 1000, output=100, req_id="reserved")
    for request, scaling in ((pinned, _scaling("recompute")), (reserved, _scaling("reserve"))):
        scheduler = FakeScheduler([request])
        _state(scaling).grow(scheduler)
        assert scheduler.preempted == [] and request.ropeserve.factor == request.ropeserve.start


def test_a_waiting_request_grows_without_preemption(hasher):
    from vllm.v1.request import RequestStatus

    scaling = _scaling("recompute")
    session = _request(hasher, scaling, 900, output=0, computed=900, req_id="session")
    # its next input chunk arrives (as Scheduler._update_request_as_session appends it): 1100 tokens
    session.prompt_token_ids.extend(range(900, 1100))
    session._all_token_ids.extend(range(900, 1100))
    session.num_prompt_tokens = 1100
    session.update_block_hashes()
    session.status = RequestStatus.WAITING
    scheduler = FakeScheduler([], [session])
    _state(scaling).grow(scheduler)
    assert session.ropeserve.factor == 2.0 and session.num_computed_tokens == 0
    assert scheduler.preempted == ["freed session"]


def test_rerotate_keeps_the_blocks_and_asks_the_workers_to_convert_them(hasher):
    scaling = _scaling("rerotate")
    crosses = _request(hasher, scaling, 1000, output=25, req_id="crosses")
    salt, hashes = crosses.cache_salt, list(crosses.block_hashes)
    scheduler = FakeScheduler([crosses])
    state = _state(scaling)
    state.grow(scheduler)
    assert scheduler.preempted == [] and crosses.ropeserve.factor == 2.0
    assert (crosses.cache_salt, crosses.block_hashes) == (salt, hashes)  # a salt of its own, never shared
    output = types.SimpleNamespace(num_scheduled_tokens={"crosses": 1}, finished_req_ids=set())
    state.annotate(scheduler, output)
    assert output.ropeserve.rerotate == {"crosses": (1.0, 2.0)}


def test_each_step_tells_the_workers_new_factors_once_and_counts_tokens(hasher):
    from rope_ext.vllm_plugin import stats

    scaling = _scaling("recompute")
    a = _request(hasher, scaling, 100, req_id="a")
    b = _request(hasher, scaling, 3000, req_id="b")
    scheduler = FakeScheduler([a, b])
    state = _state(scaling)
    first = types.SimpleNamespace(num_scheduled_tokens={"a": 100, "b": 3000}, finished_req_ids=set())
    state.annotate(scheduler, first)
    assert first.ropeserve.factors == {"a": 1.0, "b": 4.0}
    second = types.SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 1}, finished_req_ids=set())
    state.annotate(scheduler, second)
    assert second.ropeserve.factors == {}  # the workers know them
    a.ropeserve.factor = 2.0  # grown
    third = types.SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 1}, finished_req_ids={"gone"})
    state.annotate(scheduler, third)
    assert third.ropeserve.factors == {"a": 2.0}
    scheduled = stats.read_counters()[stats.SCHEDULED]
    assert scheduled[:4].tolist() == [101, 1, 3002, 0]  # buckets 1, 2, 4, 8


def test_an_override_past_its_bucket_is_counted_once(hasher):
    from rope_ext.vllm_plugin import stats

    scaling = _scaling("recompute")
    pinned = _request(hasher, scaling, 1020, override=1, computed=1020, req_id="pinned")
    scheduler = FakeScheduler([pinned])
    state = _state(scaling)
    for _ in range(3):
        state.annotate(scheduler, types.SimpleNamespace(num_scheduled_tokens={"pinned": 5}, finished_req_ids=set()))
        pinned.num_computed_tokens += 5
    assert stats.read_counters()[stats.OVERFLOW][0] == 1


def test_a_request_that_skipped_admission_stops_the_scheduler(hasher):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from rope_ext.vllm_plugin.scheduler import MissingRopeStateError

    stray = Request("stray", [1, 2, 3], SamplingParams(max_tokens=4), None, block_hasher=hasher)
    scaling = _scaling("recompute")
    with pytest.raises(MissingRopeStateError, match="stray"):
        _state(scaling).annotate(FakeScheduler([stray]), types.SimpleNamespace(
            num_scheduled_tokens={"stray": 3}, finished_req_ids=set()))
