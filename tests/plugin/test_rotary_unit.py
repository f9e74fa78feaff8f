"""The per-request rotary modules against stock vLLM rotary modules, token by token (no engine).

A flat batch mixes tokens of requests at different scales. Every token must be rotated exactly as the
stock module of its scale rotates it: plain ``RotaryEmbedding`` at scale 1, ``YaRNScalingRotaryEmbedding``
at s > 1. Checked for the CPU kernel path (``forward_cpu``) and the plain-torch path (``forward_native``),
which is also the oracle of the CUDA path (``forward_cuda`` calls the same stock kernel).

mRoPE: ``PerRequestMRotaryEmbedding`` rotates each token exactly as stock ``MRotaryEmbedding`` of its scale (plain
at 1, stock's YaRN mRoPE above), with temporal, height and width positions that differ (an image's grid) or
agree (text), interleaved sections (Qwen3-VL, Qwen3.5's partial rotary) and chunked ones (Qwen2-VL).

LongRoPE: ``PerRequestLongRope`` rotates a short request's tokens exactly as stock
``Phi3LongRoPEScaledRotaryEmbedding`` in an engine whose ``max_model_len`` is the original context (short
factors), and a long request's exactly as stock in an engine that serves the whole context (long factors).
"""

from __future__ import annotations

from types import SimpleNamespace

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
    from vllm.model_executor.layers.rotary_embedding import (
        RotaryEmbedding,
        YaRNScalingRotaryEmbedding,
    )

    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=max_factor)
    rows = scaling.max_context
    ours = PerRequestRotaryEmbedding(head_size, rotary_dim, base, True, dtype, scaling=scaling,
                                     rows_per_bucket=rows, max_num_tokens=4096)
    stock = {1.0: RotaryEmbedding(head_size, rotary_dim, rows, base, True, dtype)}
    for s in scaling.buckets[1:]:
        stock[s] = YaRNScalingRotaryEmbedding(head_size, rotary_dim, L, base, True, s, dtype)
    return ours, stock, scaling


def _assert_rotated_as_stock(ours, stock, path, factors, positions, head_size, dtype, generator, *, heads=4,
                             kv_heads=2):
    """Random queries and keys for a flat batch whose tokens have ``factors``, rotated by ``ours`` (offsets
    written as the runner writes them) and, token group by token group, by ``stock[factor]``: exactly equal.
    ``positions`` is ``[num_tokens]`` or mRoPE's ``[3, num_tokens]``. Returns the inputs and our queries."""
    num_tokens = positions.shape[-1]
    ours.token_offsets[:num_tokens] = torch.tensor([ours.row_offset(float(f)) for f in factors])
    query = torch.randn(num_tokens, heads * head_size, generator=generator).to(dtype)
    key = torch.randn(num_tokens, kv_heads * head_size, generator=generator).to(dtype)
    q_ours, k_ours = getattr(ours, path)(positions, query.clone(), key.clone())
    for s in sorted(set(factors.tolist())):
        mask = factors == s
        q_ref, k_ref = getattr(stock[s], path)(positions[..., mask], query[mask].clone(), key[mask].clone())
        assert torch.equal(q_ours[mask], q_ref), f"queries at scale {s}"
        assert torch.equal(k_ours[mask], k_ref), f"keys at scale {s}"
    return query, key, q_ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,rotary_dim,base", [(64, 64, 1e5), (128, 128, 1e4), (128, 64, 1e6)])
@pytest.mark.parametrize("path", ["forward_cpu", "forward_native"])
def test_each_token_is_rotated_as_the_stock_module_of_its_scale(vllm_config, dtype, head_size, rotary_dim,
                                                                  base, path):
    L = 1024
    ours, stock, _ = _modules(head_size, rotary_dim, base, L, 8.0, dtype)
    generator = torch.Generator().manual_seed(0)
    # Three requests, at scales 1, 2 and 8, laid out one after the other as the model runner does.
    factors = torch.tensor([1.0] * 100 + [2.0] * 120 + [8.0] * 80)
    positions = torch.cat([torch.arange(100), torch.arange(1500, 1620), torch.randint(0, 8 * L, (80,),
                                                                                       generator=generator)])
    _assert_rotated_as_stock(ours, stock, path, factors, positions, head_size, dtype, generator)


def _mrope_positions(generator, num_tokens: int, start: int) -> torch.Tensor:
    """``[3, num_tokens]`` positions from ``start``: text, then a 4 x 8 image grid (one temporal position, height
    and width running over the grid, as Qwen-VL's), then text after the grid's largest position."""
    text = torch.arange(start, start + 10)
    grid_t = torch.full((32,), start + 10)
    grid_h = start + 10 + torch.arange(4).repeat_interleave(8)
    grid_w = start + 10 + torch.arange(8).repeat(4)
    tail = torch.arange(start + 18, start + 18 + num_tokens - 42)
    return torch.stack([torch.cat([text, grid_t, tail]), torch.cat([text, grid_h, tail]),
                        torch.cat([text, grid_w, tail])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,rotary_dim,section,interleaved", [
    (128, 128, [24, 20, 20], True),  # Qwen3-VL
    (256, 64, [11, 11, 10], True),  # Qwen3.5: partial rotary 0.25
    (128, 128, [16, 24, 24], False),  # Qwen2-VL's chunked sections
])
@pytest.mark.parametrize("path", ["forward_cpu", "forward_native"])
def test_each_mrope_token_is_rotated_as_the_stock_mrope_module_of_its_scale(vllm_config, dtype, head_size, rotary_dim,
                                                                            section, interleaved, path):
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding

    from rope_ext.vllm_plugin.rotary import PerRequestMRotaryEmbedding

    L, base = 1024, 1e6
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=4.0)
    mrope = {"mrope_section": section, "mrope_interleaved": interleaved}
    ours = PerRequestMRotaryEmbedding(head_size, rotary_dim, base, True, dtype, scaling=scaling,
                                      rows_per_bucket=scaling.max_context, max_num_tokens=4096, positions_factor=1,
                                      **mrope)
    # stock, as get_rope builds it: plain mRoPE, or YaRN mRoPE over the original context (positions factor 4)
    stock = {1.0: MRotaryEmbedding(head_size, rotary_dim, scaling.max_context, base, True, dtype, **mrope,
                                   positions_factor=1)}
    for s in scaling.buckets[1:]:
        stock[s] = MRotaryEmbedding(head_size, rotary_dim, L, base, True, dtype, **mrope, scaling_factor=s,
                                    positions_factor=1)
    generator = torch.Generator().manual_seed(0)
    # Three requests with an image each, at scales 1, 2 and 4, laid out one after the other as the runner does.
    factors = torch.tensor([1.0] * 100 + [2.0] * 120 + [4.0] * 80)
    positions = torch.cat([_mrope_positions(generator, 100, 0), _mrope_positions(generator, 120, 1500),
                           _mrope_positions(generator, 80, 3900)], dim=1)
    query, key, q_ours = _assert_rotated_as_stock(ours, stock, path, factors, positions, head_size, dtype,
                                                  generator)
    # the grid's height and width positions matter: the same tokens with text positions rotate otherwise
    q_text, _ = getattr(ours, path)(positions[0].expand(3, -1), query.clone(), key.clone())
    assert not torch.equal(q_text, q_ours)


def test_stock_yarn_mrope_ramps_over_its_table_length(vllm_config):
    """Stock's static YaRN mRoPE sizes its table ``positions_factor`` x L and computes YaRN's correction range
    over that length instead of L: with the factor models get by default (4) its rows differ from YaRN's
    (transformers', and the plugin's, in every positions factor); with 1 they are equal."""
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding

    from rope_ext.vllm_plugin.rotary import PerRequestMRotaryEmbedding

    L, mrope = 256, {"mrope_section": [8, 12, 12], "mrope_interleaved": False}
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=4.0)
    rows = 4 * L
    for positions_factor in (1, 4):
        ours = PerRequestMRotaryEmbedding(64, 64, 1e4, True, torch.float32, scaling=scaling, rows_per_bucket=rows,
                                          max_num_tokens=16, positions_factor=positions_factor, **mrope)
        start, capacity = ours.row_offset(2.0), 2 * L  # the rows bucket 2 serves
        ours_rows = ours.cos_sin_cache[start:start + capacity]
        stock = {f: MRotaryEmbedding(64, 64, L, 1e4, True, torch.float32, **mrope, scaling_factor=2.0,
                                     positions_factor=f).cos_sin_cache[:capacity] for f in (1, 4)}
        assert torch.equal(ours_rows, stock[1])
        assert not torch.allclose(ours_rows, stock[4], atol=1e-3)


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


LONGROPE_L, LONGROPE_MAX = 256, 1024


def _longrope_parameters(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": LONGROPE_L,
            "short_factor": [1.0 + 0.05 * i for i in range(half)], "long_factor": [1.0 + 0.9 * i for i in range(half)]}


def _stock_longrope(head_size, rotary_dim, params, max_model_len, dtype):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    config = VllmConfig()
    config.model_config = SimpleNamespace(max_model_len=max_model_len)  # what stock's __init__ reads of it
    with set_current_vllm_config(config):
        return Phi3LongRoPEScaledRotaryEmbedding(head_size, rotary_dim, LONGROPE_MAX, LONGROPE_L, params["rope_theta"],
                                                 True, dtype, params["short_factor"], params["long_factor"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 32), (96, 96)])
def test_longrope_tokens_are_rotated_as_stocks_short_or_long_engine(vllm_config, monkeypatch, dtype, head_size,
                                                                     rotary_dim):
    from rope_ext.vllm_plugin.config import scaling_from_rope_parameters
    from rope_ext.vllm_plugin.rotary import PerRequestLongRope

    params = _longrope_parameters(rotary_dim)
    monkeypatch.setenv("ROPESERVE_DYNAMIC_ROPE", "1")
    scaling = scaling_from_rope_parameters(params, LONGROPE_MAX)
    assert scaling.method == "longrope" and scaling.buckets == (1.0, 4.0)
    ours = PerRequestLongRope(head_size, rotary_dim, 1e4, True, dtype, scaling=scaling, rows_per_bucket=LONGROPE_MAX,
                              max_num_tokens=512)
    short_engine = _stock_longrope(head_size, rotary_dim, params, LONGROPE_L, dtype)
    long_engine = _stock_longrope(head_size, rotary_dim, params, LONGROPE_MAX, dtype)
    assert not short_engine.use_long_rope and long_engine.use_long_rope
    generator = torch.Generator().manual_seed(0)
    # A short request (positions < L) and a long one (past L and back near 0), one after the other.
    positions = torch.cat([torch.arange(200), torch.arange(700, 900), torch.arange(50)])
    factors = torch.tensor([1.0] * 200 + [4.0] * 250)
    ours.token_offsets[:450] = torch.tensor([ours.row_offset(float(f)) for f in factors])
    query = torch.randn(450, 2 * head_size, generator=generator).to(dtype)
    key = torch.randn(450, head_size, generator=generator).to(dtype)
    q_ours, k_ours = ours(positions, query.clone(), key.clone())
    for factor, stock in ((1.0, short_engine), (4.0, long_engine)):
        mask = factors == factor
        q_ref, k_ref = stock(positions[mask], query[mask].clone(), key[mask].clone())
        assert torch.equal(q_ours[mask], q_ref), f"queries of the {'short' if factor == 1 else 'long'} request"
        assert torch.equal(k_ours[mask], k_ref), f"keys of the {'short' if factor == 1 else 'long'} request"
    assert torch.equal(positions[:200], torch.arange(200))  # positions untouched


def test_fused_qk_norm_rope_gate_is_turned_off_for_per_request_layers(vllm_config):
    """Qwen3NextAttention (Qwen3-Next, Qwen3.5) computes ``use_fused_qk_norm_rope_gate`` from its rotary module:
    NeoX style, bf16/fp16, on CUDA or XPU; the fused kernel then reads ``cos_sin_cache`` at the raw positions.
    A per-request module in bf16 meets every condition the flag reads (so on CUDA it would be on); the plugin
    turns it off in those layers, and leaves a layer with a plain rotary module alone."""
    from torch import nn
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    from rope_ext.vllm_plugin.rotary import unfuse

    ours, _, _ = _modules(64, 64, 1e5, 512, 4.0, torch.bfloat16)
    assert ours.is_neox_style and ours.dtype in (torch.float16, torch.bfloat16)  # what the flag reads of it

    class Attention(nn.Module):  # the attributes Qwen3NextAttention.__init__ sets (compat.py checks them)
        def __init__(self, rotary_emb):
            super().__init__()
            self.rotary_emb = rotary_emb
            self.use_fused_qk_norm_rope_gate = True  # as computed on CUDA

    model = nn.ModuleDict({"dynamic": Attention(ours),
                           "plain": Attention(RotaryEmbedding(64, 64, 512, 1e4, True, torch.bfloat16))})
    assert unfuse(model) == ["dynamic.use_fused_qk_norm_rope_gate"]
    assert not model["dynamic"].use_fused_qk_norm_rope_gate and model["plain"].use_fused_qk_norm_rope_gate
    assert unfuse(model) == []
