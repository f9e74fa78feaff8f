"""The start-up probe's diagnosis (rope_ext.vllm_plugin.probe.diagnose_worker), no engine.

When the probe's two requests come out the same, each worker says where the offsets were lost: the runner
wrote none for the probe's tokens, or these layers' rotary modules ignore them (named), or every module
applies them, so the graph that ran does not call them. A model of two layers sharing one rotary module
(vLLM memoizes them per configuration) and a third with its own, on a stand-in worker whose runner holds
the plugin's real state; the engine-level refusals are in test_engine_core.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from rope_ext import RopeScaling

pytest.importorskip("vllm")

SCALING = RopeScaling(method="dynamic_yarn", original_max_position=256, max_factor=4.0)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config

    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding
    from rope_ext.vllm_plugin.runner import RunnerRope

    monkeypatch.setenv("ROPESERVE_METRICS_DIR", str(tmp_path))
    with set_current_vllm_config(VllmConfig()):
        shared, own = (PerRequestRotaryEmbedding(64, 64, base, True, torch.float32, scaling=SCALING,
                                                 rows_per_bucket=SCALING.max_context, max_num_tokens=256)
                       for base in (1e4, 1e6))
    layers = nn.ModuleList(nn.Module() for _ in range(3))
    for layer, rotary in zip(layers, (shared, shared, own)):
        layer.self_attn = nn.Module()
        layer.self_attn.rotary_emb = rotary
    model = nn.Module()
    model.layers = layers
    runner = types.SimpleNamespace(get_model=lambda: model)
    runner._ropeserve = RunnerRope([shared, own], torch.device("cpu"))
    return types.SimpleNamespace(model_runner=runner)


def _probe_step(worker) -> None:
    """What the probe's step leaves in the shared buffer: 64 tokens at bucket 0, 64 at the largest."""
    state = worker.model_runner._ropeserve
    state.bucket_of.update({"low": 0, "high": len(SCALING.buckets) - 1})
    state.fill(["low", "high"], np.array([64, 64]), np.array([0, 0]))


def test_offsets_the_runner_never_wrote_are_blamed_on_the_runner(worker):
    from rope_ext.vllm_plugin.probe import diagnose_worker

    (finding,) = diagnose_worker(worker)
    assert "wrote no per-request offsets for the probe's tokens" in finding


def test_rotary_modules_that_ignore_the_offsets_are_named_by_layer(worker, monkeypatch):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    from rope_ext.vllm_plugin.probe import diagnose_worker

    _probe_step(worker)
    shared = worker.model_runner.get_model().layers[0].self_attn.rotary_emb
    for name in ("forward_native", "forward_cpu"):  # this one module reads the table at the raw positions
        monkeypatch.setattr(shared, name, getattr(RotaryEmbedding, name).__get__(shared))
    monkeypatch.setattr(shared, "_forward_method", shared.forward_cpu)
    before = worker.model_runner._ropeserve.buffer.clone()
    (finding,) = diagnose_worker(worker)
    assert finding.endswith("ignore the per-request offsets when called: layers.0.self_attn.rotary_emb, "
                            "layers.1.self_attn.rotary_emb")
    assert torch.equal(worker.model_runner._ropeserve.buffer, before)  # the probe's offsets are left as they were


def test_modules_that_apply_the_offsets_put_the_blame_on_the_graph(worker):
    from rope_ext.vllm_plugin.probe import diagnose_worker

    _probe_step(worker)
    before = worker.model_runner._ropeserve.buffer.clone()
    (finding,) = diagnose_worker(worker)
    assert "every rotary module (3 layer(s)) applies them when called" in finding
    assert torch.equal(worker.model_runner._ropeserve.buffer, before)
