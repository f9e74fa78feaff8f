"""The start-up checks (rope_ext.vllm_plugin.checks), one test per set-up the plugin refuses.

The worker stands in as the attributes the check reads (its runner, the vLLM config), built around real
vLLM classes where the check asks "is it this class" (the V1 runner, rotary modules). Several of these
set-ups cannot start on the CPU test bed at all (the V2 runner needs Triton, vLLM turns dual-batch
overlap off on CPU), so the checks are exercised here; tests/plugin/test_engine_architectures.py starts a
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


def _runner(model, cls=None, device="cpu"):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = object.__new__(cls or GPUModelRunner)
    runner.model = model
    runner.device = torch.device(device)
    runner.get_model = lambda: model
    return runner


def _worker(runner, *, architectures=("LlamaForCausalLM",), growth=None, dbo=False, spec=None):
    params = {**DYNAMIC, **({"growth": growth} if growth else {})}
    text = types.SimpleNamespace(rope_parameters=params, max_position_embeddings=L)
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=text, architectures=list(architectures), max_model_len=4 * L),
        parallel_config=types.SimpleNamespace(enable_dbo=dbo), speculative_config=spec)
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


def test_the_v2_model_runner_is_refused():
    class V2Runner:
        pass

    runner = _runner(Model(_rotary()))
    runner.__class__ = V2Runner
    with pytest.raises(Exception, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        _check(_worker(runner))


def test_a_runner_that_overrides_the_hook_is_refused():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class Custom(GPUModelRunner):
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            raise AssertionError("never called")

    with pytest.raises(Exception, match="overrides _prepare_inputs"):
        _check(_worker(_runner(Model(_rotary()), Custom)))


def test_an_unproven_architecture_is_refused_unless_named(monkeypatch, caplog):
    from rope_ext.vllm_plugin.checks import UnsupportedSetupError

    with pytest.raises(UnsupportedSetupError, match="Qwen3NextForCausalLM.*ROPESERVE_ALLOW_ARCHITECTURES="):
        _check(_worker(_runner(Model(_rotary())), architectures=("Qwen3NextForCausalLM",)))
    monkeypatch.setenv("ROPESERVE_ALLOW_ARCHITECTURES", "Qwen3NextForCausalLM")
    _check(_worker(_runner(Model(_rotary())), architectures=("Qwen3NextForCausalLM",)))
    assert "no fidelity test covers" in caplog.text


def test_dual_batch_overlap_is_refused():
    with pytest.raises(Exception, match="--enable-dbo"):
        _check(_worker(_runner(Model(_rotary())), dbo=True))


def test_a_drafter_with_a_model_is_refused_and_ngram_is_not():
    with pytest.raises(Exception, match="drafter.*eagle"):
        _check(_worker(_runner(Model(_rotary())), spec=types.SimpleNamespace(method="eagle")))
    _check(_worker(_runner(Model(_rotary())), spec=types.SimpleNamespace(method="ngram")))


def test_rerotate_off_cpu_is_refused_at_start_up():
    with pytest.raises(Exception, match="'rerotate'.*cuda.*'recompute'"):
        _check(_worker(_runner(Model(_rotary()), device="cuda"), growth="rerotate"))


def test_a_rotary_module_built_around_get_rope_is_refused():
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    foreign = RotaryEmbedding(64, 64, L, 10000.0, True, torch.float32)  # not from get_rope
    with pytest.raises(Exception, match=r"rotary module layers\.1 \(RotaryEmbedding\)"):
        _check(_worker(_runner(Model(_rotary(), foreign))))


def test_a_dynamic_model_without_a_per_request_module_is_refused():
    plain = _rotary({"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(Exception, match="none of its rotary embeddings"):
        _check(_worker(_runner(Model(plain))))


def test_a_model_that_is_not_dynamic_is_left_alone():
    runner = _runner(Model())
    worker = _worker(runner)
    worker.vllm_config.model_config.hf_text_config.rope_parameters = {"rope_type": "default"}
    _check(worker)
    assert "_ropeserve" not in runner.__dict__
