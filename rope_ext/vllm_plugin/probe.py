"""The start-up proof: the per-request scale reaches RoPE in the engine that will serve.

Lists of what is safe (architectures, features) cannot see everything that bypasses the offsets: a compiled
graph cached by a start without the plugin, a fused kernel that reads ``cos_sin_cache`` with the raw
positions (Qwen3-Next's QK-norm + RoPE + gate on CUDA), a runner whose layout the hook no longer follows,
a rotary path a new vLLM adds. So when the engine core of a dynamic model has been built (its workers
have loaded, compiled or loaded from cache, and warmed up the graph that will run), before it reports
ready, :func:`prove_scale_applied` runs two real requests through the whole engine: the same
:data:`PROBE_TOKENS`-token prompt, one pinned at factor 1 and one at the largest bucket, one greedy token
each with its top logprobs. Through the plugin's admission, scheduler, runner hook and the compiled
model, the two must differ (other frequencies, YaRN's attention factor); identical logprobs mean the
offsets do not reach the computation, and the engine is refused with the causes that produce it.

Cost: two prefills of :data:`PROBE_TOKENS` tokens (a fraction of a second on the default model on one
CPU core; the time is logged). Like every request, the probe's two are counted in the plugin's metrics
(two admissions, at factor 1 and at the largest bucket). The probe proves reach; exactness against
stock vLLM is what the fidelity tests prove.
"""

from __future__ import annotations

import logging
import time

import numpy as np

logger = logging.getLogger("vllm.ropeserve")

PROBE_TOKENS = 64
PROBE_ID = "ropeserve-start-up-probe"


class ScaleNotAppliedError(RuntimeError):
    """The probe requests at two scales came out the same: requests would run unscaled."""


CAUSES = ("a compiled graph cached by a start without the plugin's settings (remove vLLM's torch_compile_cache for "
          "this model), a fused kernel that reads cos_sin_cache with the raw positions (Qwen3-Next and Qwen3.5 on "
          "CUDA: the fused QK-norm + RoPE + gate), a model runner whose step layout the plugin's hook does not "
          "follow, or attention layers whose rotary embedding is not the plugin's")


def probe_prompt(vocab_size: int) -> list[int]:
    """Distinct token ids spread over the vocabulary (so attention weights matter)."""
    return [(1 + 7919 * i) % vocab_size for i in range(PROBE_TOKENS)]


def prove_scale_applied(core, scaling) -> float:
    """Run the probe on the engine core ``core`` of a model with ``scaling``; raise
    :class:`ScaleNotAppliedError` if the scale does not change the output. Returns the seconds spent."""
    start = time.perf_counter()
    prompt = probe_prompt(core.vllm_config.model_config.get_vocab_size())
    factors = (scaling.buckets[0], scaling.buckets[-1])
    for factor in factors:
        request, wave = core.preprocess_add_request(_request(f"{PROBE_ID}-{factor:g}", prompt, factor))
        core.add_request(request, wave)
    logprobs: dict[str, list] = {}
    while core.scheduler.has_requests():
        outputs, _ = core.step_fn()
        for client_outputs in (outputs or {}).values():
            for output in client_outputs.outputs:
                if output.new_logprobs is not None:
                    logprobs[output.request_id] = np.asarray(output.new_logprobs.logprobs).tolist()
    low, high = (logprobs.get(f"{PROBE_ID}-{factor:g}") for factor in factors)
    if low is None or high is None:
        raise ScaleNotAppliedError("ropeserve's start-up probe: the engine returned no logprobs for its probe requests")
    if low == high:
        raise ScaleNotAppliedError(
            f"ropeserve's start-up probe: the same {PROBE_TOKENS}-token prompt at factor {factors[0]:g} and at "
            f"factor {factors[1]:g} gave identical logprobs, so the per-request scale does not reach RoPE in the "
            f"graph this engine runs. Causes: {CAUSES}.")
    seconds = time.perf_counter() - start
    logger.info("ropeserve: start-up probe passed: factors %g and %g reach RoPE in the running engine (%.2f s)",
                factors[0], factors[1], seconds)
    return seconds


def _request(request_id: str, prompt: list[int], factor: float):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from rope_ext.vllm_plugin.admission import FACTOR_KEY

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5, ignore_eos=True,
                            extra_args={FACTOR_KEY: factor})
    return EngineCoreRequest(request_id=request_id, prompt_token_ids=prompt, mm_features=None, sampling_params=params,
                             pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
                             data_parallel_rank=None)


def patch_engine_core_start() -> None:
    """Run the probe at the end of ``EngineCore.__init__`` (the workers are warm, the engine not yet ready),
    for a dynamic model (its scheduler carries the plugin's state)."""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.__init__
    if getattr(original, "_ropeserve", False):
        return

    def __init__(self, *args, **kwargs) -> None:
        from rope_ext.vllm_plugin.scheduler import scheduler_state

        original(self, *args, **kwargs)
        state = scheduler_state(self.scheduler)
        if state is not None:
            prove_scale_applied(self, state.scaling)

    __init__._ropeserve = True
    __init__.__wrapped__ = original
    EngineCore.__init__ = __init__
