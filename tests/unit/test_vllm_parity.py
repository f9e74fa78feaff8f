"""Parity of rope_ext's cos/sin tables with vLLM 0.32.0's ``RotaryEmbedding`` and
``YaRNScalingRotaryEmbedding`` ``cos_sin_cache``, and with the short and long halves of
``Phi3LongRoPEScaledRotaryEmbedding``'s ``long_short_cos_sin_cache``, bit for bit in float32.

vLLM is imported inside each test (``vllm_rope`` fixture), never at module import, so the rest of the
unit tier runs without it; ``-m "not vllm"`` skips these. Only the rotary modules are constructed: no
engine, no model.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
import torch

from rope_ext import RopeScaling, RotaryConfig, bucket_frequencies, build_bucket_tables, cos_sin_rows

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_rope() -> Iterator[types.SimpleNamespace]:
    """vLLM's rotary classes, imported here (lazily), inside a current default ``VllmConfig``."""
    vllm = pytest.importorskip("vllm")
    import vllm.config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )
    from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import YaRNScalingRotaryEmbedding

    assert vllm.__version__ == "0.32.0", "rope_ext's tables are pinned to vLLM 0.32.0's arithmetic"
    with vllm.config.set_current_vllm_config(vllm.config.VllmConfig()):
        yield types.SimpleNamespace(plain=RotaryEmbedding, yarn=YaRNScalingRotaryEmbedding,
                                    longrope=Phi3LongRoPEScaledRotaryEmbedding)


def vllm_yarn_table(vllm_rope: types.SimpleNamespace, head: int, theta: float, L: int, s: float,
                    **kwargs: object) -> torch.Tensor:
    rope = vllm_rope.yarn(head, head, L, theta, True, s, torch.float32, **kwargs)
    return rope.cos_sin_cache


def vllm_plain_table(vllm_rope: types.SimpleNamespace, head: int, theta: float, rows: int) -> torch.Tensor:
    return vllm_rope.plain(head, head, rows, theta, True, torch.float32).cos_sin_cache


YARN_GRID = [
    (head, theta, L, s)
    for head in (64, 128)
    for theta in (1e4, 1e6)
    for L in (2048, 4096)
    for s in (2, 2.5, 4)
] + [(64, 1e5, 8192, 8)]  # the default model: head 64, theta 1e5, L 8192, served at s = 8


@pytest.mark.parametrize(("head", "theta", "L", "s"), YARN_GRID)
@pytest.mark.parametrize("method", ["yarn", "dynamic_yarn"])
def test_yarn_bucket_equals_vllm_yarn_table(vllm_rope: types.SimpleNamespace, method: str, head: int,
                                            theta: float, L: int, s: float) -> None:
    expected = vllm_yarn_table(vllm_rope, head, theta, L, s)
    scaling = RopeScaling(method=method, original_max_position=L, max_factor=8.0, buckets=(1, 2, 2.5, 4, 8))
    ours = cos_sin_rows(bucket_frequencies(RotaryConfig(head, theta), scaling, s), expected.shape[0])
    assert ours.dtype == expected.dtype == torch.float32
    assert ours.shape == expected.shape == (round(L * s), head)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(("kwargs", "ours"), [
    ({"mscale": 1.0, "mscale_all_dim": 0.5}, {"mscale": 1.0, "mscale_all_dim": 0.5}),
    ({"attention_factor": 0.8}, {"attention_factor": 0.8}),
    ({"truncate": False}, {"truncate": False}),
    ({"beta_fast": 16, "beta_slow": 2}, {"beta_fast": 16, "beta_slow": 2}),
])
def test_yarn_knobs_equal_vllm(vllm_rope: types.SimpleNamespace, kwargs: dict, ours: dict) -> None:
    expected = vllm_yarn_table(vllm_rope, 64, 1e5, 2048, 4, **kwargs)
    scaling = RopeScaling(method="yarn", original_max_position=2048, max_factor=4.0, **ours)
    table = cos_sin_rows(bucket_frequencies(RotaryConfig(64, 1e5), scaling, 4), expected.shape[0])
    assert torch.equal(table, expected)


@pytest.mark.parametrize(("head", "theta"), [(64, 1e4), (64, 1e5), (128, 1e6)])
@pytest.mark.parametrize("method", ["yarn", "dynamic_yarn", "dynamic_ntk", "linear", "ntk_by_parts"])
def test_bucket_one_equals_vllm_plain_rope(vllm_rope: types.SimpleNamespace, method: str, head: int,
                                           theta: float) -> None:
    # A request at or below L runs at s = 1, which must be exactly the unscaled model.
    expected = vllm_plain_table(vllm_rope, head, theta, 2048)
    scaling = RopeScaling(method=method, original_max_position=2048, max_factor=4.0)
    assert torch.equal(cos_sin_rows(bucket_frequencies(RotaryConfig(head, theta), scaling, 1), 2048), expected)


def test_stacked_tables_hold_vllm_tables_at_their_offsets(vllm_rope: types.SimpleNamespace) -> None:
    L, head, theta, rows = 1024, 64, 1e5, 4096
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=L, max_factor=4.0)
    tables = build_bucket_tables(RotaryConfig(head, theta), scaling, rows_per_bucket=rows)
    assert tables.factors == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0)  # the default buckets, sqrt(2) apart
    assert tables.cos_sin_cache.shape == (5 * rows, head)
    assert [tables.row_offset(s) for s in tables.factors] == [k * rows for k in range(5)]
    expected = {1.0: vllm_plain_table(vllm_rope, head, theta, rows)}
    for s in tables.factors[1:]:  # floor(L * s) rows (vLLM's table for that factor); the bucket holds more
        expected[s] = vllm_yarn_table(vllm_rope, head, theta, L, s)
    for s, table in expected.items():
        start = tables.row_offset(s)
        assert torch.equal(tables.cos_sin_cache[start:start + table.shape[0]], table)


@pytest.mark.parametrize(("head", "rotary_dim", "L", "max_position"), [(64, 32, 256, 1024), (96, 96, 4096, 131072)])
@pytest.mark.parametrize("mscales", [{}, {"short_mscale": 1.0, "long_mscale": 1.25}])
def test_longrope_buckets_equal_vllm_short_and_long_tables(vllm_rope: types.SimpleNamespace, head: int,
                                                           rotary_dim: int, L: int, max_position: int,
                                                           mscales: dict) -> None:
    half = rotary_dim // 2
    short, long = [1.0 + 0.02 * i for i in range(half)], [1.0 + 2.5 * i for i in range(half)]
    import vllm.config

    config = vllm.config.VllmConfig()
    config.model_config = types.SimpleNamespace(max_model_len=max_position)  # what stock's __init__ reads of it
    with vllm.config.set_current_vllm_config(config):
        stock = vllm_rope.longrope(head, rotary_dim, max_position, L, 1e4, True, torch.float32, short, long, **mscales)
    scaling = RopeScaling(method="longrope", original_max_position=L, max_factor=max_position / L,
                          short_factor=short, long_factor=long, **mscales)
    tables = build_bucket_tables(RotaryConfig(rotary_dim, 1e4), scaling)
    cache = stock.long_short_cos_sin_cache
    assert torch.equal(tables.cos_sin_cache[:L], cache[:L])  # stock's short table has L rows
    assert torch.equal(tables.cos_sin_cache[tables.row_offset(scaling.max_factor):], cache[L:])
