"""The guard: the plugin refuses, loudly, a vLLM whose internals differ from the ones it patches."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from rope_ext.vllm_plugin.compat import PINNED_VLLM_VERSION, IncompatibleVllmError, check_internals  # noqa: E402


def test_installed_vllm_is_the_pinned_one():
    import vllm

    assert vllm.__version__ == PINNED_VLLM_VERSION
    check_internals()


def test_a_changed_model_runner_signature_is_refused(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", lambda self, scheduler_output: None)
    with pytest.raises(IncompatibleVllmError, match="_prepare_inputs"):
        check_internals()


def test_a_different_version_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(IncompatibleVllmError, match="version 0.33.0"):
        check_internals()


def test_register_is_idempotent_and_patches_once():
    from vllm.model_executor.layers import rotary_embedding
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rope_ext.vllm_plugin import register

    register()
    patched = (rotary_embedding.get_rope, InputProcessor.process_inputs, GPUModelRunner._prepare_inputs)
    register()
    assert (rotary_embedding.get_rope, InputProcessor.process_inputs, GPUModelRunner._prepare_inputs) == patched
    assert all(getattr(fn, "_ropeserve", False) for fn in patched)
