"""cos/sin bucket tables: vLLM's row layout (cos half, sin half, times the attention factor), stacking
with row offsets, dtype and size accounting. The bit-exact comparison with vLLM is in test_vllm_parity.
"""

from __future__ import annotations

import math

import pytest
import torch

from rope_ext import (
    RopeConfigError,
    RopeFrequencies,
    RopeScaling,
    RotaryConfig,
    bucket_frequencies,
    build_bucket_tables,
    cos_sin_rows,
    get_mscale,
    table_nbytes,
)

ROTARY = RotaryConfig(64, 1e5)
SCALING = RopeScaling(method="dynamic_yarn", original_max_position=256, max_factor=8.0)


def test_row_layout() -> None:
    inv_freq = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float32)
    rows = cos_sin_rows(RopeFrequencies(inv_freq, 2.0), 5)
    assert rows.shape == (5, 6) and rows.dtype == torch.float32
    for p in range(5):
        for i, f in enumerate(inv_freq.tolist()):
            assert rows[p, i].item() == pytest.approx(2.0 * math.cos(p * f), abs=1e-6)
            assert rows[p, 3 + i].item() == pytest.approx(2.0 * math.sin(p * f), abs=1e-6)


def test_bucket_tables_are_stacked_with_row_offsets() -> None:
    tables = build_bucket_tables(ROTARY, SCALING, rows_per_bucket=300)
    assert tables.factors == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0, 2 ** 2.5, 8.0)  # the default: sqrt(2) apart
    assert tables.rows_per_bucket == 300
    assert tables.cos_sin_cache.shape == (7 * 300, 64)
    for k, s in enumerate(tables.factors):
        assert tables.bucket_index(s) == k
        assert tables.row_offset(s) == 300 * k
        own = cos_sin_rows(bucket_frequencies(ROTARY, SCALING, s), 300)
        assert torch.equal(tables.cos_sin_cache[300 * k:300 * (k + 1)], own)
    # Position 0 is cos 0 = attention factor, sin 0 = 0, in every bucket.
    for s in tables.factors:
        row = tables.cos_sin_cache[tables.row_offset(s)]
        assert torch.equal(row[:32], torch.full((32,), get_mscale(s), dtype=torch.float32))
        assert torch.equal(row[32:], torch.zeros(32))


def test_default_rows_are_the_served_context_and_size_is_predicted() -> None:
    tables = build_bucket_tables(ROTARY, SCALING)
    assert tables.rows_per_bucket == SCALING.max_context == 2048
    assert tables.nbytes == table_nbytes(ROTARY, SCALING) == 7 * 2048 * 64 * 4
    half = build_bucket_tables(ROTARY, SCALING, rows_per_bucket=16, dtype=torch.bfloat16)
    assert half.cos_sin_cache.dtype == torch.bfloat16
    assert table_nbytes(ROTARY, SCALING, torch.bfloat16) == 7 * 2048 * 64 * 2


def test_buckets_differ_from_each_other() -> None:
    tables = build_bucket_tables(ROTARY, SCALING, rows_per_bucket=64)
    blocks = tables.cos_sin_cache.view(7, 64, 64)
    for a in range(7):
        for b in range(a + 1, 7):
            assert not torch.equal(blocks[a], blocks[b])


def test_unknown_bucket_is_rejected() -> None:
    tables = build_bucket_tables(ROTARY, SCALING, rows_per_bucket=4)
    with pytest.raises(RopeConfigError) as info:
        tables.row_offset(3.0)
    assert info.value.field == "factor" and "3 is not a bucket; buckets: 1, 1.4142135623730951, 2, 2.8284271247461903, 4, 5.656854249492381, 8" in str(info.value)


@pytest.mark.parametrize("rows", [0, -1, 2.0, True])
def test_rows_per_bucket_is_validated(rows: object) -> None:
    with pytest.raises(RopeConfigError) as info:
        build_bucket_tables(ROTARY, SCALING, rows_per_bucket=rows)
    assert info.value.field == "rows_per_bucket"
