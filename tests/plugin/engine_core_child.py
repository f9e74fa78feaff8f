"""A child process for tests/plugin/test_engine_core.py: vLLM's engine in this one process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that the scheduler's requests can be read and the plugin's
hook broken on purpose. Prints one JSON object::

    python tests/plugin/engine_core_child.py MODEL_DIR admission    # API path vs the engine core directly,
                                                                    # and pinned requests fit their bucket
    python tests/plugin/engine_core_child.py MODEL_DIR broken       # the runner's fill disabled
    python tests/plugin/engine_core_child.py MODEL_DIR bypassed     # the rotary modules ignore the offsets
"""

from __future__ import annotations

import json
import os
import sys
import time

L = 1000
OVERRIDES = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": 4.0,
                                 "original_max_position_embeddings": L}, "max_position_embeddings": 4 * L}


def main(model: str, what: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine import EngineCoreRequest

    from rope_ext.vllm_plugin import register, stats
    from rope_ext.vllm_plugin.probe import PROBE_ID
    from rope_ext.vllm_plugin.runner import RunnerRope
    from rope_ext.vllm_plugin.scheduler import SchedulerRope

    register()
    admitted: dict[str, dict] = {}
    original_added = SchedulerRope.added

    def added(self, request) -> None:
        if request.request_id.startswith(PROBE_ID):  # the start-up probe's requests
            return original_added(self, request)
        admitted[request.request_id] = {"factor": request.ropeserve.factor, "cache_salt": request.cache_salt,
                                        "block_hashes": [h.hex() for h in request.block_hashes[:2]],
                                        "max_tokens": request.max_tokens}
        original_added(self, request)

    SchedulerRope.added = added
    if what == "broken":
        RunnerRope.fill = lambda self, *args: None  # a vLLM change that skips the plugin's fill, simulated
    if what == "bypassed":  # a fused kernel that reads the table at the raw positions, simulated
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

        for name in ("forward_native", "forward_cpu"):
            setattr(PerRequestRotaryEmbedding, name, getattr(RotaryEmbedding, name))
    llm = LLM(model=model, dtype="float32", max_model_len=4 * L, hf_overrides=OVERRIDES, enforce_eager=True,
              max_num_seqs=4)
    prompt = [(7 * i) % 30000 + 100 for i in range(1500)]  # past L: factor 2
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], [params], use_tqdm=False)
    out: dict = {"api": next(iter(admitted.values()))}
    if what == "admission":
        core = llm.llm_engine.engine_core  # the in-process client; its engine core
        direct = EngineCoreRequest(request_id="direct-1", prompt_token_ids=prompt, mm_features=None,
                                   sampling_params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                   pooling_params=None, arrival_time=time.time(), lora_request=None,
                                   cache_salt=None, data_parallel_rank=None)
        core.add_request(direct)
        while core.engine_core.scheduler.has_requests():
            core.engine_core.step()
        out["direct"] = admitted["direct-1"]
        if "block_hashes" in EngineCoreRequest.__struct_fields__:  # vLLM 0.34: hashes from a front-end
            out["frontend_hashed"] = frontend_hashed(core, prompt, admitted)
        out["pinned"] = pinned_requests(llm, core, prompt[: L - 10], admitted)
    out["counters"] = {kind: values[:4].tolist() for kind, values in stats.read_counters().items()}
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(stats.RopeCollector())
    out["metrics"] = generate_latest(registry).decode()  # what vLLM's /metrics would show of the plugin
    print("RESULT " + json.dumps(out))


def frontend_hashed(core, prompt: list[int], admitted: dict[str, dict]) -> dict:
    """A request whose prompt block hashes a front-end computed (vLLM 0.34's EngineCoreRequest.block_hashes)
    under the salt it knew (none), as vLLM's engine core itself would hash them; the engine core would use
    them as they are."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.request import Request

    def request(request_id: str, block_hashes=None) -> EngineCoreRequest:
        return EngineCoreRequest(request_id=request_id, prompt_token_ids=prompt, mm_features=None,
                                 sampling_params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                 pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
                                 data_parallel_rank=None, block_hashes=block_hashes)

    hashes = list(Request.from_engine_core_request(request("frontend"), core.engine_core.request_block_hasher)
                  .block_hashes)
    core.add_request(request("direct-hashed", hashes))
    while core.engine_core.scheduler.has_requests():
        core.engine_core.step()
    return {"sent": [h.hex() for h in hashes[:2]], **admitted["direct-hashed"]}


def pinned_requests(llm, core, prompt: list[int], admitted: dict[str, dict]) -> dict:
    """Requests pinned at factor 1 (capacity L) with a prompt 10 tokens short of it: 20 new tokens are
    refused, by the front-end (vLLM's 400) and by the engine core; none is capped at 10 tokens, both ways."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine import EngineCoreRequest

    from rope_ext import RopeConfigError

    def params(max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args={"rope_factor": 1})

    def direct(request_id: str, max_tokens: int) -> EngineCoreRequest:
        return EngineCoreRequest(request_id=request_id, prompt_token_ids=prompt, mm_features=None,
                                 sampling_params=params(max_tokens), pooling_params=None, arrival_time=time.time(),
                                 lora_request=None, cache_salt=None, data_parallel_rank=None)

    out: dict = {}
    try:
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], [params(20)], use_tqdm=False)
    except VLLMValidationError as exc:
        out["refused"] = {"message": exc.args[0], "parameter": exc.parameter}
    try:
        core.add_request(direct("direct-over", 20))
    except RopeConfigError as exc:
        out["direct_refused"] = str(exc)
    (capped,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], [params(None)], use_tqdm=False)
    out["capped"] = {"finish_reason": capped.outputs[0].finish_reason, "prompt": len(capped.prompt_token_ids),
                     "generated": len(capped.outputs[0].token_ids)}
    core.add_request(direct("direct-capped", 4 * L - len(prompt)))  # max_tokens as vLLM fills in a missing one
    while core.engine_core.scheduler.has_requests():
        core.engine_core.step()
    out["direct_capped"] = admitted["direct-capped"]["max_tokens"]
    out["admitted"] = sorted(admitted)
    return out


if __name__ == "__main__":
    main(*sys.argv[1:3])
