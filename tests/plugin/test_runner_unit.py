"""The worker side (rope_ext.vllm_plugin.runner) and the shared counters (.stats), no engine.

RunnerRope applies what the scheduler tells it and writes one offset per token, for requests in batch
order; a request it was never told about, or a step without the scheduler's annotation, stops the step
(never guessed). The counters written by several processes add up in the Prometheus collector.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from rope_ext import RopeScaling

pytest.importorskip("vllm")

L = 256
# Buckets pinned to powers of two (offsets and counters read easily); the default ones work the same.
SCALING = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, buckets=(1, 2, 4, 8))


@pytest.fixture(autouse=True)
def _metrics_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPESERVE_METRICS_DIR", str(tmp_path))


@pytest.fixture
def state():
    from vllm.config import VllmConfig, set_current_vllm_config

    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding
    from rope_ext.vllm_plugin.runner import RunnerRope

    with set_current_vllm_config(VllmConfig()):
        modules = [PerRequestRotaryEmbedding(64, 64, base, True, torch.float32, scaling=SCALING,
                                             rows_per_bucket=SCALING.max_context, max_num_tokens=4096)
                   for base in (1e4, 1e6)]
    return RunnerRope(modules, torch.device("cpu"))


def _step(factors, finished=(), rerotate=None):
    from rope_ext.vllm_plugin.scheduler import RopeStep

    return types.SimpleNamespace(ropeserve=RopeStep(dict(factors), rerotate or {}), finished_req_ids=set(finished))


def test_fill_writes_each_tokens_row_offset_in_batch_order(state):
    rows = SCALING.max_context
    state.apply(None, _step({"a": 1.0, "b": 4.0, "c": 2.0}))
    state.fill(["b", "a", "c"], np.array([3, 2, 1, 99]), np.zeros(4, dtype=np.int64))  # arrays outlast the batch
    expected = [2 * rows] * 3 + [0] * 2 + [rows]
    assert state.buffer[:6].tolist() == expected
    assert all(m.token_offsets is state.buffer for m in state.modules)  # both modules read it


def test_a_drafter_pass_gets_its_own_layouts_offsets_in_the_steps_request_order(state):
    """A draft model's first pass runs one more token per request than the target, its next passes one token
    per request: each pass's offsets follow its ``query_start_loc``, at each request's factor."""
    rows = SCALING.max_context
    state.apply(None, _step({"a": 1.0, "b": 4.0, "c": 2.0}))
    state.fill(["b", "a", "c"], np.array([3, 2, 1]), np.zeros(3, dtype=np.int64))
    state.fill_draft(torch.tensor([0, 4, 7, 9], dtype=torch.int32))
    assert state.buffer[:9].tolist() == [2 * rows] * 4 + [0] * 3 + [rows] * 2
    state.fill_draft(np.array([0, 1, 2, 3]))
    assert state.buffer[:3].tolist() == [2 * rows, 0, rows]


def test_a_drafter_pass_over_other_requests_than_the_steps_stops(state):
    from rope_ext.vllm_plugin.runner import MissingFactorError

    state.apply(None, _step({"a": 1.0, "b": 4.0}))
    state.fill(["b", "a"], np.array([1, 1]), np.zeros(2, dtype=np.int64))
    with pytest.raises(MissingFactorError, match="drafter pass lays out 3 requests and the step scheduled 2"):
        state.fill_draft(np.array([0, 1, 2, 3]))


def test_a_warm_up_steps_drafts_read_plain_rows(state):
    state.apply(None, _step({"a": 4.0}))
    state.fill(["a"], np.array([5]), np.zeros(1, dtype=np.int64))
    state.fill_plain(8)  # vLLM's own warm-up step after it
    state.fill_draft(np.array([0, 4, 8]))
    assert state.buffer[:8].tolist() == [0] * 8


def test_factors_are_kept_until_the_request_finishes(state):
    state.apply(None, _step({"a": 2.0}))
    state.apply(None, _step({}))  # later steps carry no news about "a"
    state.fill(["a"], np.array([1]), np.array([0]))
    assert state.buffer[0] == SCALING.max_context
    state.apply(None, _step({}, finished={"a"}))
    from rope_ext.vllm_plugin.runner import MissingFactorError

    with pytest.raises(MissingFactorError, match="request a"):
        state.fill(["a"], np.array([1]), np.array([0]))


def test_a_step_without_the_schedulers_factors_stops(state):
    from rope_ext.vllm_plugin.runner import MissingFactorError

    with pytest.raises(MissingFactorError, match="scheduler hook"):
        state.apply(None, types.SimpleNamespace(finished_req_ids=set()))


def test_tokens_are_counted_per_factor_and_collected_across_processes(state, tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from rope_ext.vllm_plugin import stats

    state.apply(None, _step({"a": 1.0, "b": 4.0}))
    state.fill(["a", "b"], np.array([10, 5]), np.array([0, 0]))
    stats.write_buckets(SCALING.buckets)
    other = stats.Counters(stats.COMPUTED, tmp_path)  # as another worker process would write
    other.path.rename(tmp_path / "computed.99999.i64")
    other = stats.Counters(stats.COMPUTED, tmp_path)
    other.add(1, 7)
    stats.counters(stats.ADMITTED).add(2, 3)
    registry = CollectorRegistry()
    registry.register(stats.RopeCollector(tmp_path))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    tokens = {s.labels["factor"]: s.value for s in families["ropeserve_engine_rope_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"1": 10.0, "2": 7.0, "4": 5.0, "8": 0.0}
    histogram = {s.labels.get("le"): s.value for s in families["ropeserve_engine_rope_factor"].samples
                 if s.name.endswith("_bucket")}
    assert histogram["2.0"] == 0.0 and histogram["4.0"] == 3.0 and histogram["+Inf"] == 3.0


def test_tokens_past_their_buckets_capacity_are_counted(state):
    from rope_ext.vllm_plugin import stats

    state.apply(None, _step({"inside": 1.0, "crossing": 1.0, "beyond": 2.0}))
    # capacities 256 and 512: 250 + 6 ends at 256 (inside); 250 + 10 passes it by 4; 600 + 1 is past 512
    state.fill(["inside", "crossing", "beyond"], np.array([6, 10, 1]), np.array([250, 250, 600]))
    past = stats.read_counters()[stats.PAST]
    assert past[:2].tolist() == [4, 1]


def test_the_collector_is_silent_until_a_dynamic_model_records_its_buckets(tmp_path):
    from rope_ext.vllm_plugin import stats

    assert list(stats.RopeCollector(tmp_path).collect()) == []


def test_a_rank_that_does_not_count_still_fills(state):
    """Every rank of a tensor-parallel engine runs the step; only the first counts (checks._first_rank)."""
    from rope_ext.vllm_plugin import stats

    state.counts = False
    state.apply(None, _step({"a": 2.0}))
    state.fill(["a"], np.array([3]), np.array([600]))
    assert state.buffer[:3].tolist() == [SCALING.max_context] * 3
    counted = stats.read_counters()
    assert not counted[stats.COMPUTED].any() and not counted[stats.PAST].any()
