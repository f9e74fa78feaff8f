"""The start-up checks (rope_ext.vllm_plugin.checks), one test per set-up the plugin refuses.

The worker stands in as the attributes the check reads (its runner, the vLLM config), built around real
vLLM classes where the check asks "is it this class" (each runner the installed vLLM's adapter hooks,
rotary modules). Several of these set-ups cannot start on the CPU test bed at all (the V2 runner needs
Triton, vLLM turns dual-batch overlap off on CPU), so the checks are exercised here; tests/plugin/test_engine_architectures.py starts a
real engine that is refused for its architecture.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm")

L = 1024
DYNAMIC = {"rope_type": "dynamic_yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": L}


@pytest.fixture(scope="module", autouse=True)
def registered(model_dir):
    """The plugin registered, and a vLLM config current (get_rope reads the served context from it)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    from rope_ext.vllm_plugin import register

    register()
    config = VllmConfig(model_config=ModelConfig(model=model_dir, max_model_len=4 * L, skip_tokenizer_init=True))
    with set_current_vllm_config(config):
        yield


def _rotary(rope_parameters=DYNAMIC):
    from vllm.model_executor.layers import rotary_embedding

    return rotary_embedding.get_rope(64, L, rope_parameters=rope_parameters, dtype=torch.float32)


class Model(torch.nn.Module):
    def __init__(self, *modules):
        super().__init__()
        self.layers = torch.nn.ModuleList(modules)


def _hooks():
    from rope_ext.vllm_plugin.versions import adapter

    return adapter().RUNNERS


def _runner(model, cls=None, device="cpu"):
    runner = object.__new__(cls or _hooks()[0].runner_class())
    runner.model = model
    runner.device = torch.device(device)
    runner.get_model = lambda: model
    return runner


def _worker(runner, *, architectures=("LlamaForCausalLM",), growth=None, ubatching=False, spec=None):
    params = {**DYNAMIC, **({"growth": growth} if growth else {})}
    text = types.SimpleNamespace(rope_parameters=params, max_position_embeddings=L)
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=text, architectures=list(architectures), max_model_len=4 * L),
        parallel_config=types.SimpleNamespace(use_ubatching=ubatching), speculative_config=spec,
        additional_config={})
    return types.SimpleNamespace(model_runner=runner, vllm_config=config)


def _check(worker):
    from rope_ext.vllm_plugin.checks import check_runner

    check_runner(worker)


def test_a_supported_set_up_starts_and_its_modules_share_one_offsets_buffer():
    plain = _rotary({"rope_type": "default", "rope_theta": 10000.0})  # a layer the config leaves unscaled
    ours_a = _rotary()
    ours_b = _rotary({**DYNAMIC, "rope_theta": 1e6})  # another base: a table of its own
    assert ours_a is not ours_b and not torch.equal(ours_a.cos_sin_cache, ours_b.cos_sin_cache)
    runner = _runner(Model(plain, ours_a, ours_b))
    _check(_worker(runner))
    assert runner._ropeserve.modules == [ours_a, ours_b]
    assert ours_a.token_offsets is ours_b.token_offsets is runner._ropeserve.buffer


@pytest.mark.parametrize("index", [0, 1], ids=["first", "second"])
def test_every_runner_the_adapter_hooks_starts(index):
    hook = _hooks()[index]
    runner = _runner(Model(_rotary()), hook.runner_class())
    _check(_worker(runner))
    assert runner.__dict__["_ropeserve"].modules


def test_a_runner_the_adapter_does_not_hook_is_refused_naming_the_setting():
    class OtherRunner:
        pass

    runner = _runner(Model(_rotary()))
    runner.__class__ = OtherRunner
    with pytest.raises(Exception, match="OtherRunner.*Unset VLLM_USE_V2_MODEL_RUNNER"):
        _check(_worker(runner))


@pytest.mark.parametrize("which", ["layout", "execute_model"])
def test_a_runner_that_overrides_a_hook_is_refused(which):
    hook = _hooks()[0]
    name = hook.method if which == "layout" else "execute_model"
    Custom = type("Custom", (hook.runner_class(),), {name: lambda self, *args: None})
    with pytest.raises(Exception, match=f"Custom overrides {hook.method} or execute_model"):
        _check(_worker(_runner(Model(_rotary()), Custom)))


def test_an_unproven_architecture_is_served_with_a_warning_and_left_to_the_probe(caplog):
    runner = _runner(Model(_rotary()))
    _check(_worker(runner, architectures=("GraniteForCausalLM",)))
    assert "_ropeserve" in runner.__dict__
    assert "GraniteForCausalLM is not among those the fidelity tests cover" in caplog.text


def test_micro_batching_is_refused():
    """vLLM's use_ubatching: --enable-dbo, or --ubatch-size above 1 without it."""
    with pytest.raises(Exception, match="micro-batching.*--enable-dbo.*--ubatch-size"):
        _check(_worker(_runner(Model(_rotary())), ubatching=True))


def test_use_ubatching_is_true_for_a_ubatch_size_above_one_alone():
    from vllm.config import ParallelConfig

    assert ParallelConfig(ubatch_size=2).use_ubatching
    assert not ParallelConfig(ubatch_size=1).use_ubatching


def _drafting(hook, drafter_model, drafter_cls=None, **worker):
    """A worker whose runner (``hook``'s class) drafts with ``drafter_model``, as vLLM's V1 runner keeps it."""
    runner = _runner(Model(_rotary()), hook.runner_class())
    cls = drafter_cls or hook.drafter.drafter_class()
    if getattr(cls, "__abstractmethods__", None):  # vLLM 0.34's base speculator: its abstract loader stubbed
        cls = type(cls.__name__, (cls,), dict.fromkeys(cls.__abstractmethods__, lambda self, *args: None))
    drafter = object.__new__(cls)
    drafter.model = drafter_model
    setattr(runner, hook.drafter.attribute, drafter)
    return _worker(runner, spec=types.SimpleNamespace(method="draft_model"), **worker), drafter


def _drafter_hook():
    hook = next((h for h in _hooks() if h.drafter is not None), None)
    if hook is None:
        pytest.skip("no runner of this vLLM runs a drafter with a model that the plugin hooks")
    return hook


def test_a_drafter_with_a_model_is_refused_on_a_runner_whose_drafters_are_not_hooked_and_ngram_is_not():
    for hook in _hooks():
        runner = _runner(Model(_rotary()), hook.runner_class())
        _check(_worker(runner, spec=types.SimpleNamespace(method="ngram")))
        if hook.drafter is None:
            with pytest.raises(Exception, match="drafter \\(eagle\\) has a model.*does not lay out.*n-gram"):
                _check(_worker(runner, spec=types.SimpleNamespace(method="eagle")))


def test_a_drafter_with_the_targets_parameters_shares_its_offsets():
    hook = _drafter_hook()
    own = _rotary({**DYNAMIC, "rope_theta": 1e6})  # a layer of its own; the other is the target's (memoized)
    worker, drafter = _drafting(hook, Model(_rotary(), own))
    _check(worker)
    state = worker.model_runner._ropeserve
    assert drafter._ropeserve is state and state.modules == [_rotary(), own]
    assert own.token_offsets is state.buffer


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "default", "rope_theta": 10000.0}, "has plain RoPE only"),
    ({**DYNAMIC, "factor": 8.0}, "scales RoPE as .*factor=8.*the target as .*factor=4"),
], ids=["plain", "another-factor"])
def test_a_drafter_at_another_scale_is_refused(rope, message):
    worker, _ = _drafting(_drafter_hook(), Model(_rotary(rope)))
    with pytest.raises(Exception, match=f"{message}.*target's rope_parameters"):
        _check(worker)


def test_a_drafter_that_lays_out_its_passes_its_own_way_is_refused():
    hook = _drafter_hook()
    Custom = type("Custom", (hook.drafter.drafter_class(),), {hook.drafter.method: lambda self, *args: None})
    worker, _ = _drafting(hook, Model(_rotary()), Custom)
    with pytest.raises(Exception, match=f"Custom lays out its passes without {hook.drafter.method}"):
        _check(worker)


def test_a_drafter_that_lays_out_its_passes_unlike_the_target_is_refused():
    """vLLM 0.34's V2 EAGLE/MTP speculator with prefill context parallelism: its draft prefill is not the
    target's step."""
    hook = _drafter_hook()
    worker, drafter = _drafting(hook, Model(_rotary()))
    drafter.pcp_manager = object()
    feature = hook.drafter.unsupported(drafter)
    if feature is None:
        pytest.skip("this vLLM's drafter hook has no feature to refuse")
    with pytest.raises(Exception, match=f"runs with {feature}.*Turn off {feature}"):
        _check(worker)


def test_a_drafter_with_growth_by_rerotation_is_refused():
    worker, _ = _drafting(_drafter_hook(), Model(_rotary()), growth="rerotate")
    with pytest.raises(Exception, match="'rerotate'.*drafter \\(draft_model\\) keeps cached keys"):
        _check(worker)


def test_rerotate_off_cpu_or_off_the_v1_runner_is_refused_at_start_up():
    hooks = _hooks()
    with pytest.raises(Exception, match="'rerotate'.*cuda.*'recompute'"):
        _check(_worker(_runner(Model(_rotary()), device="cuda"), growth="rerotate"))
    for hook in hooks:
        worker = _worker(_runner(Model(_rotary()), hook.runner_class()), growth="rerotate")
        if hook.rerotate:
            _check(worker)
        else:
            with pytest.raises(Exception, match=f"'rerotate'.*{hook.runner_class().__qualname__} on cpu"):
                _check(worker)


def test_rerotate_on_an_mrope_model_is_refused_at_start_up():
    """Re-rotation turns each cached key by its token index; an image's mRoPE positions are not token indices."""
    hook = next((h for h in _hooks() if h.rerotate), None)
    if hook is None:
        pytest.skip("this vLLM's runners refuse growth 'rerotate' for every model")
    mrope = _rotary({**DYNAMIC, "mrope_section": [12, 10, 10], "mrope_interleaved": True})
    with pytest.raises(Exception, match="'rerotate'.*mRoPE.*Use growth 'recompute'"):
        _check(_worker(_runner(Model(mrope), hook.runner_class()), growth="rerotate"))
    _check(_worker(_runner(Model(mrope), hook.runner_class())))  # the default growth: recompute


def test_a_rotary_module_built_around_get_rope_is_refused():
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    foreign = RotaryEmbedding(64, 64, L, 10000.0, True, torch.float32)  # not from get_rope
    with pytest.raises(Exception, match=r"rotary module layers\.1 \(RotaryEmbedding\)"):
        _check(_worker(_runner(Model(_rotary(), foreign))))


def test_a_dynamic_model_without_a_per_request_module_is_refused():
    plain = _rotary({"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(Exception, match="none of its rotary embeddings"):
        _check(_worker(_runner(Model(plain))))


def test_the_switch_on_a_model_the_plugin_cannot_serve_is_refused(monkeypatch):
    """ROPESERVE_DYNAMIC_ROPE=1 on a llama3 (Llama 3.1) or plain model: never a silently static engine."""
    monkeypatch.setenv("ROPESERVE_DYNAMIC_ROPE", "1")
    worker = _worker(_runner(Model()))
    worker.vllm_config.model_config.hf_text_config.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e4}
    with pytest.raises(Exception, match=r"ROPESERVE_DYNAMIC_ROPE=1 is set.*\(llama3\).*\(yarn, longrope\).*"
                                        "Unset ROPESERVE_DYNAMIC_ROPE"):
        _check(worker)


def test_the_switch_on_an_mrope_model_builds_the_per_request_mrope_module(monkeypatch):
    """Qwen3-VL / Qwen3.5: interleaved mRoPE with yarn gets the per-request mRoPE module (its sections, stock's
    positions factor); without the switch, vLLM's own static module."""
    monkeypatch.setenv("ROPESERVE_DYNAMIC_ROPE", "1")
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": L,
              "mrope_section": [12, 10, 10], "mrope_interleaved": True}
    module = _rotary(params)
    assert type(module).__name__ == "PerRequestMRotaryEmbedding"
    assert module.mrope_section == [12, 10, 10] and module.mrope_interleaved
    # each bucket's table as long as stock's: the context times stock's default positions factor, 4
    assert module.rows_per_bucket == module.cache_max_position_num >= 4 * module.scaling.max_context
    assert module.cos_sin_cache.shape[0] == len(module.scaling.buckets) * module.rows_per_bucket
    monkeypatch.delenv("ROPESERVE_DYNAMIC_ROPE")
    assert type(_rotary(params)).__name__ == "MRotaryEmbedding"


def test_longrope_with_mrope_sections_is_refused(monkeypatch):
    monkeypatch.setenv("ROPESERVE_DYNAMIC_ROPE", "1")
    params = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": L,
              "short_factor": [1.0] * 32, "long_factor": [2.0] * 32, "mrope_section": [12, 10, 10]}
    with pytest.raises(Exception, match="LongRoPE with multimodal rotary positions is not served"):
        _rotary(params)


def test_a_model_that_is_not_dynamic_is_left_alone():
    runner = _runner(Model())
    worker = _worker(runner)
    worker.vllm_config.model_config.hf_text_config.rope_parameters = {"rope_type": "default"}
    _check(worker)
    assert "_ropeserve" not in runner.__dict__


def test_the_compile_cache_key_changes_with_the_plugins_settings(model_dir):
    """A dynamic model's compiled graph never shares vLLM's cache key with the plain model's (same config
    file, the switch on or off) nor with other plugin settings (the config's part of the key, per version)."""
    import dataclasses

    from vllm.config import ModelConfig, VllmConfig

    from rope_ext import RopeScaling
    from rope_ext.vllm_plugin.checks import key_compile_cache
    from rope_ext.vllm_plugin.versions import adapter

    key = adapter().compile_cache_key

    def config():
        return VllmConfig(model_config=ModelConfig(model=model_dir, max_model_len=4 * L, skip_tokenizer_init=True))

    scaling = RopeScaling.from_rope_parameters(DYNAMIC)
    plain, dynamic, grown = config(), config(), config()
    assert key(plain) == key(dynamic)
    key_compile_cache(dynamic, scaling)
    key_compile_cache(grown, dataclasses.replace(scaling, growth="reserve"))
    assert len({key(plain), key(dynamic), key(grown)}) == 3
    again = config()
    key_compile_cache(again, scaling)
    assert key(again) == key(dynamic)
