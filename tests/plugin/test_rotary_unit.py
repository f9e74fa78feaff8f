"""PerRequestRotaryEmbedding against stock vLLM rotary modules, token by token (no engine).

A flat batch mixes tokens of requests at different scales. Every token must be rotated exactly as the
stock module of its scale rotates it: plain ``RotaryEmbedding`` at scale 1, ``YaRNScalingRotaryEmbedding``
at s > 1. Checked for the CPU kernel path (``forward_cpu``) and the plain-torch path (``forward_native``),
which is also the oracle of the CUDA path (``forward_cuda`` calls the same stock kernel).
"""

from __future__ import annotations

import pytest
import torch

from rope_ext import RopeScaling

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()) as config:
        yield config


def _modules(head_size: int, rotary_dim: int, base: float, L: int, max_factor: float, dtype):
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, YaRNScalingRotaryEmbedding

    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=max_factor)
    rows = scaling.max_context
    ours = PerRequestRotaryEmbedding(head_size, rotary_dim, base, True, dtype, scaling=scaling,
                                     rows_per_bucket=rows, max_num_tokens=4096)
    stock = {1.0: RotaryEmbedding(head_size, rotary_dim, rows, base, True, dtype)}
    for s in scaling.buckets[1:]:
        stock[s] = YaRNScalingRotaryEmbedding(head_size, rotary_dim, L, base, True, s, dtype)
    return ours, stock, scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,rotary_dim,base", [(64, 64, 1e5), (128, 128, 1e4), (128, 64, 1e6)])
@pytest.mark.parametrize("path", ["forward_cpu", "forward_native"])
def test_each_token_is_rotated_as_the_stock_module_of_its_scale(vllm_config, dtype, head_size, rotary_dim,
                                                                  base, path):
    L = 1024
    ours, stock, scaling = _modules(head_size, rotary_dim, base, L, 8.0, dtype)
    generator = torch.Generator().manual_seed(0)
    num_tokens, heads, kv_heads = 300, 4, 2
    # Three requests, at scales 1, 2 and 8, laid out one after the other as the model runner does.
    factors = torch.tensor([1.0] * 100 + [2.0] * 120 + [8.0] * 80)
    positions = torch.cat([torch.arange(100), torch.arange(1500, 1620), torch.randint(0, 8 * L, (80,),
                                                                                       generator=generator)])
    ours.token_offsets[:num_tokens] = torch.tensor([ours.row_offset(float(f)) for f in factors])
    query = torch.randn(num_tokens, heads * head_size, generator=generator).to(dtype)
    key = torch.randn(num_tokens, kv_heads * head_size, generator=generator).to(dtype)

    q_ours, k_ours = getattr(ours, path)(positions, query.clone(), key.clone())
    for s in scaling.buckets:
        mask = factors == s
        if not mask.any():
            continue
        q_ref, k_ref = getattr(stock[s], path)(positions[mask], query[mask].clone(), key[mask].clone())
        assert torch.equal(q_ours[mask], q_ref), f"queries at scale {s}"
        assert torch.equal(k_ours[mask], k_ref), f"keys at scale {s}"


def test_positions_are_not_modified(vllm_config):
    ours, _, _ = _modules(64, 64, 1e5, 512, 4.0, torch.float32)
    positions = torch.arange(10)
    ours.token_offsets[:10] = ours.row_offset(4.0)
    ours.forward_cpu(positions, torch.randn(10, 64), torch.randn(10, 64))
    assert torch.equal(positions, torch.arange(10))


def test_table_rows_and_offsets(vllm_config):
    ours, _, scaling = _modules(64, 64, 1e5, 512, 8.0, torch.float32)
    assert ours.cos_sin_cache.shape == (len(scaling.buckets) * scaling.max_context, 64)
    assert [ours.row_offset(s) for s in scaling.buckets] == [i * scaling.max_context for i in range(len(scaling.buckets))]
    with pytest.raises(ValueError):
        ours.row_offset(3.0)
