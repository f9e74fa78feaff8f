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
offsets do not reach the computation, and the engine is refused. The refusal says where the offsets were
lost (:func:`diagnose_worker`, run on every worker): the runner never wrote them for the probe's tokens
(its step layout is not the one the hook follows), or the rotary modules that ignore them when called, by
layer name, or, when every module applies them and the runner wrote them, the graph that ran (a stale
compiled artifact, a fused kernel in the attention layers' code).

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
            f"graph this engine runs. Where: {_diagnosis(core)}. Possible causes: {CAUSES}.")
    seconds = time.perf_counter() - start
    logger.info("ropeserve: start-up probe passed: factors %g and %g reach RoPE in the running engine (%.2f s)",
                factors[0], factors[1], seconds)
    return seconds


def _diagnosis(core) -> str:
    """Every worker's findings (:func:`diagnose_worker`), each said once."""
    try:
        findings = core.collective_rpc(diagnose_worker)
    except Exception as exc:  # noqa: BLE001 - the refusal stands; only its detail is lost
        return f"the workers could not be examined ({type(exc).__name__}: {exc})"
    return "; ".join(dict.fromkeys(f for worker in findings for f in worker))


def diagnose_worker(worker) -> list[str]:
    """On a worker, after a failed probe: where its offsets were lost. The probe's step (its last) left its
    offsets in the shared buffer; each rotary module is then called as the model calls it, at bucket 0 and
    at the largest bucket, on the same query."""
    from rope_ext.vllm_plugin.rotary import PerRequestRows
    from rope_ext.vllm_plugin.runner import runner_state

    runner = worker.model_runner
    state = runner_state(runner)
    if state is None:
        return [(f"the model runner {type(runner).__qualname__} has no per-request state: the plugin's start-up "
                 "checks never ran on it")]
    if not bool(state.buffer.any()):
        return [(f"the model runner ({type(runner).__qualname__}) wrote no per-request offsets for the probe's "
                 "tokens: its step layout is not the one the plugin's hook follows")]
    names: dict[int, list[str]] = {}
    for name, module in runner.get_model().named_modules(remove_duplicate=False):
        if isinstance(module, PerRequestRows):
            names.setdefault(id(module), []).append(name)
    ignoring = [name for module in state.modules if _ignores_offsets(module) for name in names.get(id(module), [])]
    if ignoring:
        shown = ", ".join(ignoring[:3]) + (f" and {len(ignoring) - 3} more" if len(ignoring) > 3 else "")
        return [f"these rotary modules ignore the per-request offsets when called: {shown}"]
    layers = sum(map(len, names.values()))
    return [(f"the runner wrote the offsets and every rotary module ({layers} layer(s)) applies them when called, so "
             "the graph that ran does not call them with the offsets: a compiled graph cached by another start, or "
             "attention code that hands the table and the raw positions to a fused kernel")]


def _ignores_offsets(module) -> bool:
    """Whether ``module`` rotates the same query alike at bucket 0 and at its largest bucket."""
    import torch

    table = module.cos_sin_cache
    n = 8
    positions = torch.arange(1, n + 1, device=table.device)
    query = torch.randn(n, module.head_size, generator=torch.Generator().manual_seed(0)).to(table)
    saved = module.token_offsets[:n].clone()
    rotated = []
    try:
        with torch.inference_mode():
            for factor in (module.scaling.buckets[0], module.scaling.buckets[-1]):
                module.token_offsets[:n] = module.row_offset(factor)
                q, k = query.clone(), query.clone()
                out = module(positions, q, k)
                rotated.append((out[0] if out is not None and out[0] is not None else q).clone())
    finally:
        module.token_offsets[:n] = saved
    return torch.equal(rotated[0], rotated[1])


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
