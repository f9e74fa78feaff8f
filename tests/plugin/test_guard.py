"""The guard: the plugin refuses, loudly, a vLLM whose internals differ from the ones it touches.

Every internal the plugin patches or reads is listed once: the shared ones in
``rope_ext.vllm_plugin.compat.SHARED_INTERNALS``, each version's in its adapter (``.versions``). Here each
is checked against the installed vLLM (this module runs on every supported vLLM the set-up installs), a
change to any kind of entry (signature, field, attribute) is refused, and every vLLM attribute the plugin
patches is on the list.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from rope_ext.vllm_plugin.compat import (
    IncompatibleVllmError,
    check,
    check_internals,
    internals,
)
from rope_ext.vllm_plugin.versions import SUPPORTED_VERSIONS, adapter, installed_version

INTERNALS = internals()


def test_installed_vllm_is_supported_with_the_adapter_read_from_its_source():
    version_adapter = adapter()
    assert installed_version() in SUPPORTED_VERSIONS
    assert installed_version() in version_adapter.VERSIONS
    check_internals()


@pytest.mark.parametrize("internal", INTERNALS, ids=[i.target for i in INTERNALS])
def test_each_internal_is_as_the_plugin_expects(internal):
    check(internal)


def test_a_changed_signature_is_refused(monkeypatch):
    hook = adapter().RUNNERS[0]
    monkeypatch.setattr(hook.runner_class(), hook.method, lambda self: None)
    with pytest.raises(IncompatibleVllmError, match=hook.method):
        check_internals()


def test_a_missing_field_or_attribute_is_refused():
    from rope_ext.vllm_plugin.compat import Internal

    with pytest.raises(IncompatibleVllmError, match=r"lacks the fields \['rope_scale'\]"):
        check(Internal("vllm.v1.engine:EngineCoreRequest", "test", fields=("cache_salt", "rope_scale")))
    with pytest.raises(IncompatibleVllmError, match=r"no longer sets \['rope_offsets'\]"):
        check(Internal("vllm.v1.request:Request.__init__", "test", attrs=("block_hashes", "rope_offsets")))


def test_a_missing_function_is_refused(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_preempt_request")
    with pytest.raises(IncompatibleVllmError, match="_preempt_request is missing"):
        check_internals()


def test_a_different_version_is_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(IncompatibleVllmError, match="version 0.31.0"):
        check_internals()


PATCHED = {
    "vllm.model_executor.layers.rotary_embedding:get_rope",
    "vllm.v1.engine.core:EngineCore.preprocess_add_request",
    "vllm.v1.engine.core:EngineCore.__init__",
    "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
    "vllm.v1.core.sched.scheduler:Scheduler.__init__",
    "vllm.v1.core.sched.scheduler:Scheduler.schedule",
    "vllm.v1.core.sched.scheduler:Scheduler.add_request",
    "vllm.v1.worker.gpu_worker:Worker.load_model",
    "vllm.v1.worker.gpu_worker:Worker.compile_or_warm_up_model",
    "vllm.v1.worker.cpu_worker:CPUWorker.compile_or_warm_up_model",
    *(f"{hook.target}.{name}" for hook in adapter().RUNNERS for name in (hook.method, "execute_model")),
}


def test_register_is_idempotent_patches_once_and_every_patch_is_guarded():
    import importlib

    from rope_ext.vllm_plugin import register

    def resolve(target):
        module, _, qualname = target.partition(":")
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    register()
    patched = {t: resolve(t) for t in PATCHED}
    register()
    assert {t: resolve(t) for t in PATCHED} == patched
    assert all(getattr(fn, "_ropeserve", False) for fn in patched.values())
    assert PATCHED <= {i.target for i in INTERNALS}
