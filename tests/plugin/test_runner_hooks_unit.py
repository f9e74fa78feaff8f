"""The model-runner hooks of each vLLM version (rope_ext.vllm_plugin.runner, .versions), no engine.

The V2 ``GPUModelRunner`` (the CUDA default of vLLM 0.32 to 0.34) cannot run on the CPU test bed (it
needs Triton with a GPU or CPU backend), so its hook is tested here against its real types: the layout
hook reads vLLM's own ``InputBatch`` (the V2 one, and the standalone CPU runner's on 0.34), in batch
order, and writes each token's row offset; a step with no scheduled tokens, which never reaches the layout
method, still drops the finished requests. On vLLM 0.34 its EAGLE and MTP speculators are hooked too: the
real speculator class writes one offset per request before vLLM lays out its draft decode passes. The V1
runner (and its drafters) and the standalone CPU runner also run in the real-engine tests.
"""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest
import torch

from rope_ext import RopeScaling

pytest.importorskip("vllm")

L = 256
SCALING = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=8.0, buckets=(1, 2, 4, 8))
ROWS = SCALING.max_context


@pytest.fixture(autouse=True)
def _metrics_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPESERVE_METRICS_DIR", str(tmp_path))


@pytest.fixture
def runner():
    from vllm.config import VllmConfig, set_current_vllm_config

    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding
    from rope_ext.vllm_plugin.runner import RunnerRope

    with set_current_vllm_config(VllmConfig()):
        module = PerRequestRotaryEmbedding(64, 64, 1e4, True, torch.float32, scaling=SCALING, rows_per_bucket=ROWS,
                                           max_num_tokens=64)
    runner = types.SimpleNamespace()
    runner._ropeserve = RunnerRope([module], torch.device("cpu"))
    return runner


def _scheduler_output(factors, finished=(), total=1):
    from rope_ext.vllm_plugin.scheduler import RopeStep

    return types.SimpleNamespace(ropeserve=RopeStep(dict(factors), {}), finished_req_ids=set(finished),
                                 total_num_scheduled_tokens=total)


def _input_batch(target, req_ids, counts, computed):
    """vLLM's own InputBatch class, with the fields the hook reads (the others are the layout's business)."""
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    batch = object.__new__(cls)
    batch.req_ids = req_ids
    batch.num_scheduled_tokens = np.array(counts, dtype=np.int32)
    batch.num_computed_tokens_np = np.array(computed, dtype=np.int32)
    return batch


def _v2_batches():
    from rope_ext.vllm_plugin.versions import adapter

    targets = ["vllm.v1.worker.gpu.input_batch:InputBatch"]
    if any(hook.target.endswith("StandaloneCPUModelRunner") for hook in adapter().RUNNERS):
        targets.append("vllm.v1.worker.cpu.input_batch:InputBatch")
    return targets


@pytest.mark.parametrize("batch_class", _v2_batches())
def test_the_v2_layout_hook_writes_each_tokens_offset_from_the_input_batch(runner, batch_class):
    from rope_ext.vllm_plugin.runner import layout_hook, read_input_batch

    batch = _input_batch(batch_class, ["b", "a", "c"], [3, 2, 1], [0, 0, 300])
    prepare_inputs = layout_hook(lambda self, scheduler_output, batch_req_state, *rest: batch, read_input_batch)
    result = prepare_inputs(runner, _scheduler_output({"a": 1.0, "b": 4.0, "c": 2.0}), object(), object(), 0)
    assert result is batch
    assert runner._ropeserve.buffer[:6].tolist() == [2 * ROWS] * 3 + [0] * 2 + [ROWS]
    # "c" computes position 300 at factor 2 (capacity 512): nothing past capacity


def test_the_v2_runner_hook_is_installed_on_vllms_class_with_its_signature():
    import inspect

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from rope_ext.vllm_plugin import register
    from rope_ext.vllm_plugin.runner import V2_RUNNER

    register()
    for name in ("prepare_inputs", "execute_model"):
        method = GPUModelRunner.__dict__[name]
        assert method._ropeserve
    params = list(inspect.signature(GPUModelRunner.prepare_inputs.__wrapped__).parameters)
    assert params[:5] == ["self", "scheduler_output", "batch_req_state", "batch_desc", "num_active_loras"]
    assert V2_RUNNER.runner_class() is GPUModelRunner


def test_a_step_without_tokens_drops_the_finished_requests(runner):
    from rope_ext.vllm_plugin.runner import (
        execute_model_hook,
        layout_hook,
        read_input_batch,
    )

    batch = _input_batch(_v2_batches()[0], ["a"], [4], [0])
    layout_hook(lambda self, *args: batch, read_input_batch)(runner, _scheduler_output({"a": 2.0}))
    assert runner._ropeserve.bucket_of == {"a": 1}
    calls = []
    execute_model = execute_model_hook(lambda self, scheduler_output, *args: calls.append(scheduler_output))
    empty = _scheduler_output({}, finished=["a"], total=0)
    execute_model(runner, empty)
    assert calls == [empty]
    assert runner._ropeserve.bucket_of == {}  # before: kept until the next step with tokens, or forever


def _v2_drafter_hook():
    from rope_ext.vllm_plugin.versions import adapter

    hook = next((h.drafter for h in adapter().RUNNERS if h.drafter is not None and h.drafter.attribute == "speculator"),
                None)
    if hook is None:
        pytest.skip("this vLLM's V2 runner has no drafter hook (vLLM 0.32's V2 drafters are refused)")
    return hook


def test_the_v2_eagle_and_mtp_speculators_are_hooked_and_the_draft_model_one_is_not():
    """vLLM 0.34's V2 runner: EAGLE and MTP (TargetDependentARSpeculator) inherit the hooked multi-step decode;
    its sibling, the separate draft model's StandaloneARSpeculator, does not (refused at start-up)."""
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator
    from vllm.v1.worker.gpu.spec_decode.mtp.speculator import MTPSpeculator
    from vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator import StandaloneARSpeculator

    from rope_ext.vllm_plugin import register

    hook = _v2_drafter_hook()
    register()
    for cls in (EagleSpeculator, MTPSpeculator):
        assert getattr(cls, hook.method)._ropeserve
    assert not getattr(getattr(StandaloneARSpeculator, hook.method), "_ropeserve", False)


def test_the_v2_draft_decode_passes_read_one_offset_per_request_before_vllm_lays_them_out(runner):
    """The draft prefill runs on the target's step (its offsets are in place); before the multi-step decode
    lays out one token per request, the hook writes each request's row offset, in the step's order. vLLM's
    own method is called (its first access to the drafter stops it here: no GPU)."""
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator

    from rope_ext.vllm_plugin import register

    hook = _v2_drafter_hook()
    register()
    state = runner._ropeserve
    state.apply(None, _scheduler_output({"a": 1.0, "b": 4.0, "c": 2.0}))
    state.fill(["b", "a", "c"], np.array([4, 4, 1]), np.zeros(3, dtype=np.int64))  # the target's step: 9 tokens
    seen = []

    class Reached(Exception):
        pass

    def first_call(dp_sync_state, num_reqs):
        seen.append(state.buffer[:num_reqs].tolist())
        raise Reached

    speculator = object.__new__(EagleSpeculator)
    speculator._ropeserve = state
    speculator._build_uniform_batch_dp_sync = first_call
    with pytest.raises(Reached):
        getattr(speculator, hook.method)(object(), None, 3, False, types.SimpleNamespace(num_reqs=3), None, False, 3)
    assert seen == [[2 * ROWS, 0, ROWS]]
