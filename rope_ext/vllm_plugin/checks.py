"""Start-up checks: a dynamic model either runs with every piece of the plugin in place, or does not start.

A plugin that quietly does nothing is worse than none: the operator would see factors in metrics while
every request runs with plain RoPE. So when a worker loads a dynamic model (``Worker.load_model``),
:func:`check_runner` verifies, and raises :class:`UnsupportedSetupError` naming the setting to change:

- the model runner actually running is one the installed vLLM's adapter hooks (:mod:`.versions`: V1 and
  V2 on 0.32/0.33, V2 and the standalone CPU runner on 0.34), with the plugin's hooks in place (a runner
  subclass that overrides them is refused);
- the switch (``ROPESERVE_DYNAMIC_ROPE=1``) is on only for a model the plugin serves per request (``yarn``
  or ``longrope``: a ``llama3`` or plain model would otherwise run at its own scale while the operator
  asked for dynamic);
- every rotary module of the model is the plugin's, or a plain one built for layers the model's config
  does not scale (Gemma 3's sliding-window layers); a rotary module built any other way is refused;
- fused kernels that would read a per-request table at the raw positions (Qwen3-Next's and Qwen3.5's
  QK-norm + RoPE + gate on CUDA) are turned off in those layers (:func:`.rotary.unfuse`);
- no enabled feature bypasses the per-token offsets: micro-batching (``--enable-dbo`` or ``--ubatch-size``
  above 1, vLLM's ``use_ubatching``) slices a step into micro-batches that would read the first one's
  offsets;
- a speculative drafter with a model (EAGLE, MTP, a draft model) runs only on a runner whose drafters the
  adapter hooks (vLLM 0.32's V1 runner; 0.34's V2 runner for EAGLE and MTP), with every one of its rotary modules the plugin's, at the target's
  scaling (so its passes rotate each request's tokens at that request's scale), and not with growth by
  re-rotation (the drafter's cached keys would keep their old scale); model-free drafters (n-gram, suffix)
  are fine everywhere;
- growth by re-rotation runs on vLLM 0.32's V1 runner on the CPU backend only, and not for multimodal
  RoPE (mRoPE), whose positions are not token indices.

:data:`PROVEN_ARCHITECTURES` documents what the fidelity tests cover (each with a real-engine test); another
architecture is served with a warning that its fidelity is unproven.

:func:`check_scheduler` verifies, in the engine core, that the scheduler runs the plugin's hooks.
"""

from __future__ import annotations

import logging
import weakref

logger = logging.getLogger("vllm.ropeserve")

PROVEN_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
    "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",  # hybrid, interleaved partial mRoPE
    "PaddleOCRVLForConditionalGeneration", "Qwen3VLForConditionalGeneration",  # mRoPE, an image included
})
MODEL_FREE_DRAFTERS = frozenset({"ngram", "ngram_gpu", "suffix"})

# Rotary modules get_rope built for parameters the plugin leaves alone (plain RoPE layers of a model
# whose other layers are dynamic): recorded by the get_rope wrapper, allowed by check_runner.
PLAIN_ROTARY_MODULES: weakref.WeakSet = weakref.WeakSet()


class UnsupportedSetupError(RuntimeError):
    """This vLLM set-up would not apply the per-request scale; the message names the setting to change."""


def _refuse(what: str, change: str) -> None:
    raise UnsupportedSetupError(f"ropeserve cannot serve this dynamic-RoPE model exactly: {what}. {change}")


def check_scheduler(scheduler) -> None:
    cls = type(scheduler)
    if not (getattr(cls.schedule, "_ropeserve", False) and getattr(cls.add_request, "_ropeserve", False)):
        _refuse(f"the scheduler {cls.__module__}.{cls.__qualname__} overrides schedule() or add_request() without "
                "the plugin's hooks", "Use vLLM's own scheduler (drop --scheduler-cls).")


def check_setup(worker):
    """Before the model is built: the runner, the architecture and the features (see the module
    docstring). Returns the model's scaling, or None when the model is not dynamic."""
    from rope_ext.vllm_plugin.config import (
        SWITCH_ENV,
        SWITCHED_ROPE_TYPES,
        scaling_for_model,
        switch_enabled,
    )
    from rope_ext.vllm_plugin.versions import adapter

    runner = worker.model_runner
    config = worker.vllm_config
    scaling = scaling_for_model(config.model_config)
    if scaling is None:
        if switch_enabled():
            rope_type = _rope_types(config.model_config)
            _refuse(f"{SWITCH_ENV}=1 is set, and the model's rope type ({rope_type}) is not one the plugin serves "
                    f"per request ({', '.join(SWITCHED_ROPE_TYPES)}), so every request would run at the model's own "
                    "scale",
                    f"Unset {SWITCH_ENV} to serve this model as vLLM does.")
        return None
    hook = runner_hook(runner, adapter().RUNNERS)
    if config.parallel_config.use_ubatching:
        _refuse("micro-batching (dual-batch overlap or --ubatch-size > 1) splits each step into micro-batches "
                "the per-token offsets do not follow", "Turn off --enable-dbo and leave --ubatch-size at 0 or 1.")
    unproven = set(config.model_config.architectures or ()) - PROVEN_ARCHITECTURES
    if unproven:
        logger.warning("ropeserve: architecture %s is not among those the fidelity tests cover (%s): its exactness "
                       "is unproven", ", ".join(sorted(unproven)),
                       ", ".join(sorted(PROVEN_ARCHITECTURES)))
    spec = config.speculative_config
    if spec is not None and spec.method not in MODEL_FREE_DRAFTERS:
        if hook.drafter is None:
            _refuse(f"the speculative drafter ({spec.method}) has a model, and the plugin does not lay out its passes' "
                    f"offsets on {type(runner).__qualname__} (it does on vLLM 0.32's V1 runner and, for EAGLE and MTP, "
                    "on vLLM 0.34's V2 runner)",
                    "Use a model-free drafter (n-gram, suffix) or no speculative decoding on this runner.")
        if scaling.growth == "rerotate":
            _refuse(f"growth 'rerotate' re-rotates the target's cached keys, and the speculative drafter "
                    f"({spec.method}) keeps cached keys of its own", "Use growth 'recompute' (the default).")
    key_compile_cache(config, scaling)
    if scaling.growth == "rerotate" and not (hook.rerotate and runner.device.type == "cpu"):
        _refuse(f"growth 'rerotate' (re-rotating cached keys) is implemented and validated on vLLM 0.32's V1 "
                f"runner on CPU only, and this worker runs {type(runner).__qualname__} on {runner.device.type}",
                "Use growth 'recompute' (the default) or 'reserve'.")
    return scaling


def key_compile_cache(config, scaling) -> None:
    """Put the plugin's settings into vLLM's compile cache key, before anything is compiled or loaded.

    vLLM keys its compiled artifacts (``torch_compile_cache`` and the AOT cache) by its known ``VLLM_*``
    environment, the config (``compute_hash()`` on 0.32, ``compile_factors()`` on 0.34: the adapter's
    ``compile_cache_key``) and the traced code; none of them changes with
    ``ROPESERVE_DYNAMIC_ROPE`` (the model's config says ``yarn`` either way), so a dynamic model could load a
    plain model's graph, in which the offsets never enter. ``additional_config`` is part of the config's key
    (as a dict, its contents), so the plugin's settings there give a dynamic model's graph a
    key of its own, one per set of settings that changes the graph (rope type, buckets, growth, ...)."""
    additional = config.additional_config
    if not isinstance(additional, dict):
        _refuse(f"vLLM's additional_config is a {type(additional).__name__}, not a dict, so the plugin cannot key "
                "the compile cache by its settings", "Leave --additional-config unset or give it as a JSON dict.")
    config.additional_config = {**additional, "ropeserve": repr(scaling)}


def _rope_types(model_config) -> str:
    params = getattr(model_config.hf_text_config, "rope_parameters", None) or {}
    layer_params = params.values() if all(isinstance(p, dict) for p in params.values()) and params else [params]
    return ", ".join(sorted({str(p.get("rope_type", p.get("type", "default"))) for p in layer_params}))


def runner_hook(runner, hooks):
    """The hook of the runner class ``runner`` is, or a refusal naming the runner and the setting."""
    cls = type(runner)
    for hook in hooks:
        if issubclass(cls, hook.runner_class()):
            if not hook.hooked(runner):
                _refuse(f"{cls.__qualname__} overrides {hook.method} or execute_model without the plugin's hooks",
                        "Use vLLM's own model runner.")
            return hook
    supported = ", ".join(h.target for h in hooks)
    _refuse(f"the model runner is {cls.__module__}.{cls.__qualname__}, which the plugin does not hook on this "
            f"vLLM (it hooks {supported})", "Unset VLLM_USE_V2_MODEL_RUNNER and turn off the features that "
            "select another runner.")


def check_runner(worker) -> None:
    """After the model is built: every rotary module is the plugin's or a plain one the config asked for.
    On success the runner gets its :class:`~rope_ext.vllm_plugin.runner.RunnerRope`. (Runs
    :func:`check_setup` first; a no-op for models that are not dynamic.)"""
    from rope_ext.vllm_plugin.rotary import PerRequestMRotaryEmbedding, unfuse
    from rope_ext.vllm_plugin.runner import RunnerRope
    from rope_ext.vllm_plugin.versions import adapter

    scaling = check_setup(worker)
    if scaling is None:
        return
    runner = worker.model_runner
    architectures = set(worker.vllm_config.model_config.architectures or ())
    ours = _rotary_modules(runner.get_model(), "model", "This architecture is not supported.")
    if not ours:
        _refuse("the model built none of its rotary embeddings through the plugin (its layers do not read "
                "rope_parameters through get_rope)", "This architecture is not supported.")
    first = ours[0]
    drafter, drafter_rotary = _check_drafter(runner, runner_hook(runner, adapter().RUNNERS), first.scaling)
    ours += [m for m in drafter_rotary if all(m is not o for o in ours)]  # its own, or the target's (memoized)
    if scaling.growth == "rerotate" and any(isinstance(m, PerRequestMRotaryEmbedding) for m in ours):
        _refuse("growth 'rerotate' re-rotates each cached key at its token index, and a multimodal (mRoPE) model's "
                "positions are not token indices (an image's grid)", "Use growth 'recompute' (the default).")
    if any((m.scaling.buckets, m.rows_per_bucket) != (first.scaling.buckets, first.rows_per_bucket) for m in ours):
        _refuse("the model's dynamic rotary modules disagree on their buckets", "Give every layer type the same "
                "factor, buckets and original context.")
    unfused = unfuse(runner.get_model()) + (unfuse(drafter.model) if drafter is not None else [])
    if unfused:
        logger.info("ropeserve: fused RoPE kernels that would read the table at raw positions turned off in %d "
                    "layer(s) (%s, ...)", len(unfused), unfused[0])
    runner._ropeserve = RunnerRope(ours, runner.device, counts=_first_rank())
    if drafter is not None:
        drafter._ropeserve = runner._ropeserve
        logger.info("ropeserve: the speculative drafter (%s) drafts at each request's scale", type(drafter).__qualname__)
    logger.info("ropeserve: %d per-request rotary module(s) in %s; buckets %s", len(ours),
                ", ".join(sorted(architectures)), list(first.scaling.buckets))


def _rotary_modules(model, where: str, change: str) -> list:
    """The plugin's rotary modules in ``model`` (the served model, or the drafter's), refusing any other
    than a plain one get_rope built for layers the config leaves unscaled."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    from rope_ext.vllm_plugin.rotary import PerRequestRows

    ours = []
    stock_rotary = (RotaryEmbeddingBase, Phi3LongRoPEScaledRotaryEmbedding)  # the latter is a plain nn.Module
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, PerRequestRows):
            ours.append(module)
        elif isinstance(module, stock_rotary) and module not in PLAIN_ROTARY_MODULES:
            _refuse(f"the {where}'s rotary module {name} ({type(module).__qualname__}) was not built by get_rope for "
                    "the layers the model leaves unscaled", change)
    return ours


def _check_drafter(runner, hook, scaling):
    """The runner's speculative drafter with a model and its rotary modules, once it is known to draft at
    each request's scale (its class's passes hooked, its rotary modules the plugin's at ``scaling``);
    ``(None, [])`` without one."""
    drafter = hook.drafter.drafter(runner) if hook.drafter is not None else None
    if drafter is None:
        return None, []
    name = type(drafter).__qualname__
    change = ("Give the drafter's config (an EAGLE or draft checkpoint's config.json) the target's rope_parameters, "
              "or use a model-free drafter (n-gram, suffix).")
    if not hook.drafter.hooked(drafter):
        _refuse(f"the speculative drafter {name} lays out its passes without {hook.drafter.method}, where the plugin "
                "writes their offsets", "Use EAGLE, EAGLE-3, MTP or a draft model (vLLM's proposers that keep that "
                "method), or a model-free drafter (n-gram, suffix).")
    feature = hook.drafter.unsupported(drafter)
    if feature is not None:
        _refuse(f"the speculative drafter {name} runs with {feature}, which lays its passes out unlike the target's "
                "step", f"Turn off {feature}, or use a model-free drafter (n-gram, suffix).")
    rotary = _rotary_modules(drafter.model, "drafter", change)
    plain = [m for _, m in drafter.model.named_modules() if m in PLAIN_ROTARY_MODULES]
    if plain and not rotary:
        _refuse(f"the speculative drafter {name} has plain RoPE only, so its drafts past the original context "
                "would be rotated unscaled", change)
    for module in rotary:
        if module.scaling != scaling:
            _refuse(f"the speculative drafter {name} scales RoPE as {module.scaling}, the target as {scaling}", change)
    return drafter, rotary


def _first_rank() -> bool:
    """Whether this worker is the first of its engine's tensor- and pipeline-parallel ranks (every rank runs
    every step: the first one counts the tokens). Without parallel groups there is one rank."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tp_group,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        return True
    return get_tp_group().rank_in_group == 0 and get_pp_group().rank_in_group == 0


def patch_worker() -> None:
    """Run :func:`check_setup` before each worker builds its model and :func:`check_runner` after (engine
    start-up): a set-up the plugin refuses never gets as far as building the model. While the worker warms
    up (``compile_or_warm_up_model``), vLLM's own warm-up steps run at plain rows (:mod:`.runner`)."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model
    if getattr(original, "_ropeserve", False):
        return

    def load_model(self, *args, **kwargs) -> None:
        check_setup(self)
        original(self, *args, **kwargs)
        check_runner(self)

    load_model._ropeserve = True
    load_model.__wrapped__ = original
    Worker.load_model = load_model
    for cls in (Worker, CPUWorker):
        cls.compile_or_warm_up_model = _warm_up(cls.__dict__["compile_or_warm_up_model"])


def _warm_up(original):
    def compile_or_warm_up_model(self, *args, **kwargs):
        from rope_ext.vllm_plugin.runner import runner_state

        state = runner_state(self.model_runner)
        if state is None:
            return original(self, *args, **kwargs)
        state.warming_up = True  # vLLM's own warm-up steps carry no factors: plain rows
        try:
            return original(self, *args, **kwargs)
        finally:
            state.warming_up = False

    compile_or_warm_up_model._ropeserve = True
    compile_or_warm_up_model.__wrapped__ = original
    return compile_or_warm_up_model
