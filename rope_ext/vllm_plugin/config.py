"""Which models the plugin acts on, and their scaling settings read from the model's RoPE parameters.

The plugin acts on a model whose ``rope_parameters`` say ``rope_type`` ``dynamic_yarn``,
``dynamic_ntk`` or ``dynamic_linear`` (set them with ``--hf-overrides``), or, when the environment
variable ``ROPESERVE_DYNAMIC_ROPE=1`` is set, on a model whose own config says ``yarn`` (Qwen-style):
its ``factor`` becomes the maximum factor; or ``longrope`` (Phi-3): its short factors serve requests up
to ``original_max_position_embeddings``, its long factors longer ones (buckets 1 and
``max_position_embeddings / original``). Every other model is left to vLLM untouched.

Keys read (besides vLLM's own): ``factor`` (maximum factor; vLLM then serves ``max_position_embeddings
* factor`` tokens), ``original_max_position_embeddings`` (L; default ``max_position_embeddings``),
``buckets``, ``generation_reserve``, ``finetuned_factor``, ``headroom``, ``growth`` (``"reserve"``,
``"recompute"`` or ``"rerotate"``, see :mod:`rope_ext.policy` and :mod:`.scheduler`), and YaRN's knobs.
Invalid values raise ``rope_ext.RopeConfigError`` naming the field, exactly as ``rope_ext`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from rope_ext import RopeConfigError, RopeScaling

DYNAMIC_ROPE_TYPES = frozenset({"dynamic_yarn", "dynamic_ntk", "dynamic_linear"})
SWITCH_ENV = "ROPESERVE_DYNAMIC_ROPE"
# What the switch turns a model's own rope type into: YaRN's family of scales, LongRoPE's two tables.
SWITCHED_ROPE_TYPES = {"yarn": "dynamic_yarn", "longrope": "longrope"}


def switch_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def scaling_from_rope_parameters(rope_parameters: Mapping[str, Any] | None,
                                 max_position_embeddings: int | None) -> RopeScaling | None:
    """The model's per-request scaling settings, or None when the plugin should leave it alone."""
    if not rope_parameters:
        return None
    params = dict(rope_parameters)
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in SWITCHED_ROPE_TYPES and switch_enabled():
        params["rope_type"] = SWITCHED_ROPE_TYPES[rope_type]
    elif rope_type not in DYNAMIC_ROPE_TYPES:
        return None
    if params.get("mrope_section") is not None and params["rope_type"] == "longrope":
        raise RopeConfigError("mrope_section", "LongRoPE with multimodal rotary positions is not served per "
                              "request (stock vLLM builds plain LongRoPE for it); serve this model without "
                              f"{SWITCH_ENV}=1")
    return RopeScaling.from_rope_parameters(params, max_position_embeddings=max_position_embeddings)


def scaling_for_model(model_config: Any) -> RopeScaling | None:
    """Scaling settings of a vLLM ``ModelConfig`` (None when the model does not ask for the plugin).

    Models whose layer types have RoPE parameters of their own (Gemma 3: ``{"full_attention": {...},
    "sliding_attention": {...}}``) are dynamic when any layer type is; those that are must agree (they may
    differ in base, which each layer's table follows)."""
    hf_config = model_config.hf_text_config
    params = getattr(hf_config, "rope_parameters", None)
    max_position = getattr(hf_config, "max_position_embeddings", None)
    if params and all(isinstance(value, Mapping) for value in params.values()):
        found = {scaling_from_rope_parameters(p, max_position) for p in params.values()} - {None}
        if len(found) > 1:
            raise RopeConfigError("rope_parameters", "layer types ask for different dynamic scalings "
                                  f"({', '.join(sorted(params))}); give them the same factor, buckets and L")
        return found.pop() if found else None
    return scaling_from_rope_parameters(params, max_position)
