"""Warm starts on vLLM's CPU backend: its AOT compile cache reloads instead of compiling again.

vLLM (0.32.0 through 0.34.0 with torch >= 2.10) saves each compiled model to
``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<hash>/rank_<r>_<dp>/model`` and, on the next
start of the same configuration, loads it (``vllm.compilation.decorators._try_load_aot_compiled_fn``).
The load then calls ``finalize_loading`` on the artifact's compiled function, which only vLLM's own
backend result has (``VllmSerializableFunction``). vLLM's CPU compiled mode (``DYNAMO_TRACE_ONCE`` with
torch's inductor backend) saves torch's ``BundledAOTAutogradSerializableCallable`` instead, already loaded
when deserialized and without that method, so every reload fails ("'function' object has no attribute
'finalize_loading'"), vLLM logs "Compiling model again due to a load failure", and every start pays the
whole compilation (about 90 s on the default model).

:func:`patch_aot_reload` gives such an artifact a ``finalize_loading`` that does nothing, which is all it
lacks: the second start logs "Directly load AOT compilation" and serves the same numbers, bit for bit
(``tests/plugin/test_engine_compile_cache.py``). Any other artifact is left as vLLM loads it. It applies to
every model an engine serves, dynamic or not (a start-up fix for the CPU backend that ships with the plugin);
a dynamic model's artifacts never mix with a plain model's because the plugin keys the cache by its settings
(:func:`rope_ext.vllm_plugin.checks.key_compile_cache`), and the start-up probe (:mod:`.probe`) refuses a
cached graph that does not apply the offsets. ``VLLM_DISABLE_COMPILE_CACHE=1`` turns the cache off as usual.
"""

from __future__ import annotations

import functools


def _loaded_without_finalize(artifact) -> bool:
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

    return isinstance(artifact, BundledAOTAutogradSerializableCallable) and "finalize_loading" not in vars(artifact)


def patch_aot_reload() -> None:
    """Make ``torch.compiler.load_compiled_function`` (the call vLLM's reload makes) give torch's inductor
    artifacts the no-op ``finalize_loading`` vLLM calls. Idempotent."""
    import torch.compiler

    original = torch.compiler.load_compiled_function
    if getattr(original, "_ropeserve", False):
        return

    @functools.wraps(original)
    def load_compiled_function(*args, **kwargs):
        loaded = original(*args, **kwargs)
        artifact = loaded._artifacts.compiled_fn
        if _loaded_without_finalize(artifact):
            artifact.finalize_loading = lambda vllm_config: None  # deserialized means loaded: nothing left to do
        return loaded

    load_compiled_function._ropeserve = True
    torch.compiler.load_compiled_function = load_compiled_function
