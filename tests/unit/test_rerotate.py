"""Re-rotating cached keys between scales (rope_ext.rerotate): the fast path against the plain reference,
against a fresh rotation at the new scale, and vLLM's stock rotary kernel driven by a delta table.

Grid: methods YaRN / NTK / linear (their bucket tables), head sizes 64 and 128 with full and partial
rotary dims, NeoX and GPT-J layouts, scale pairs up, down and across several buckets, positions from 0 to
the last row of the largest bucket, float32 and bfloat16.

Stated tolerances (``M`` = the largest |key| involved, ``EPS`` = float32 machine epsilon 2^-23):
- float32: ``4 * EPS * M`` (measured: at most 2 EPS * M): float32 rounding, nothing more.
- bfloat16, fast path vs reference (both computed in >= float32, rounded once to bf16): one bf16 ulp of
  the value plus the float32 term, ``2^-7 * |ref| + 4 * EPS * M``.
- bfloat16, anything vs a fresh bf16 rotation, or vLLM's kernel with a bf16 delta table:
  ``2^-6 * M`` (two bf16 ulps at the largest key; measured up to 0.0072 M).
"""

from __future__ import annotations

import functools

import pytest
import torch

from rope_ext import (
    RopeConfigError,
    RopeScaling,
    RotaryConfig,
    bucket_frequencies,
    build_bucket_tables,
    get_mscale,
)
from rope_ext.rerotate import (
    delta_rows,
    delta_table,
    rerotate,
    rerotate_reference,
    rotate_keys,
)

EPS = torch.finfo(torch.float32).eps
L = 1024
MAX_FACTOR = 8.0
KV_HEADS = 3
METHODS = ("dynamic_yarn", "dynamic_ntk", "dynamic_linear")
HEADS = ((64, 64), (128, 128), (64, 32), (128, 64))  # (head_size, rotary_dim)
PAIRS = ((1.0, 2.0), (2.0, 4.0), (1.0, 8.0), (4.0, 8.0), (8.0, 1.0), (2.0, 2.0))


@functools.cache
def setup(method: str, rotary_dim: int):
    scaling = RopeScaling(method=method, original_max_position=L, max_factor=MAX_FACTOR)
    rotary = RotaryConfig(rotary_dim, 1e4)
    return scaling, rotary, build_bucket_tables(rotary, scaling)


def positions_grid(seed: int = 0, n: int = 400) -> torch.Tensor:
    """Both ends of every bucket's range plus random positions up to the last row of the largest."""
    generator = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0, 1, 2, L - 1, L, 2 * L - 1, 2 * L, 4 * L, int(MAX_FACTOR * L) - 1])
    return torch.cat([edges, torch.randint(0, int(MAX_FACTOR * L), (n - edges.numel(),), generator=generator)])


def raw_keys(n: int, head_size: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, KV_HEADS * head_size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rotate_at(tables, factor: float, keys: torch.Tensor, positions: torch.Tensor, head_size: int,
              is_neox: bool) -> torch.Tensor:
    """RoPE at bucket ``factor``: what the engine caches for these keys."""
    rows = tables.cos_sin_cache[tables.row_offset(factor) + positions]
    return rotate_keys(keys, rows, head_size=head_size, is_neox=is_neox)


def max_abs(*tensors: torch.Tensor) -> float:
    return max(t.float().abs().max().item() for t in tensors)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: intra-op threads only add contention (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRID = [(m, h, r, neox, a, b) for m in METHODS for h, r in HEADS for neox in (True, False) for a, b in PAIRS]
GRID_IDS = [f"{m}-h{h}r{r}-{'neox' if neox else 'gptj'}-{a:g}to{b:g}" for m, h, r, neox, a, b in GRID]


@pytest.mark.parametrize(("method", "head_size", "rotary_dim", "is_neox", "factor_a", "factor_b"), GRID, ids=GRID_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_path_equals_reference(method, head_size, rotary_dim, is_neox, factor_a, factor_b, dtype) -> None:
    scaling, rotary, tables = setup(method, rotary_dim)
    positions = positions_grid()
    cached = rotate_at(tables, factor_a, raw_keys(positions.numel(), head_size, dtype), positions, head_size, is_neox)
    fast = rerotate(cached, positions, delta_table(tables, factor_a, factor_b), head_size=head_size, is_neox=is_neox)
    ref = rerotate_reference(cached, positions, bucket_frequencies(rotary, scaling, factor_a),
                             bucket_frequencies(rotary, scaling, factor_b), head_size=head_size, is_neox=is_neox)
    assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape == cached.shape
    bound = 4 * EPS * max_abs(cached, ref)
    diff = (fast.float() - ref.float()).abs()
    if dtype == torch.float32:
        assert diff.max().item() <= bound
    else:
        assert bool((diff <= 2 ** -7 * ref.float().abs() + bound).all())


@pytest.mark.parametrize(("method", "head_size", "rotary_dim", "is_neox", "factor_a", "factor_b"), GRID, ids=GRID_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rerotated_keys_equal_keys_rotated_at_the_new_scale(method, head_size, rotary_dim, is_neox, factor_a,
                                                            factor_b, dtype) -> None:
    _, _, tables = setup(method, rotary_dim)
    positions = positions_grid()
    keys = raw_keys(positions.numel(), head_size, dtype)
    cached = rotate_at(tables, factor_a, keys, positions, head_size, is_neox)
    fresh = rotate_at(tables, factor_b, keys, positions, head_size, is_neox)
    converted = rerotate(cached, positions, delta_table(tables, factor_a, factor_b), head_size=head_size,
                         is_neox=is_neox)
    tolerance = (4 * EPS if dtype == torch.float32 else 2 ** -6) * max_abs(cached, fresh)
    assert (converted.float() - fresh.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0])
def test_same_scale_is_the_identity_bit_for_bit(dtype, is_neox, factor) -> None:
    _, _, tables = setup("dynamic_yarn", 32)
    delta = delta_table(tables, factor, factor)
    half = delta.shape[1] // 2
    assert torch.equal(delta[:, :half], torch.ones_like(delta[:, :half]))
    assert torch.equal(delta[:, half:], torch.zeros_like(delta[:, half:]))
    positions = positions_grid()
    keys = raw_keys(positions.numel(), 64, dtype)
    assert torch.equal(rerotate(keys, positions, delta, head_size=64, is_neox=is_neox), keys)


@pytest.mark.parametrize(("factor_a", "factor_b"), [(1.0, 2.0), (1.0, 8.0), (2.0, 8.0), (8.0, 2.0)])
def test_the_magnitude_ratio_is_applied_exactly_once(factor_a, factor_b) -> None:
    scaling, rotary, tables = setup("dynamic_yarn", 64)
    ratio = get_mscale(factor_b) / get_mscale(factor_a)
    delta = delta_table(tables, factor_a, factor_b)
    assert torch.allclose(delta[:, :32].double().hypot(delta[:, 32:].double()),
                          torch.full((delta.shape[0], 32), ratio, dtype=torch.float64), rtol=4 * EPS, atol=0)
    positions = positions_grid()
    cached = rotate_at(tables, factor_a, raw_keys(positions.numel(), 64, torch.float32), positions, 64, True)
    for converted in (rerotate(cached, positions, delta, head_size=64),
                      rerotate_reference(cached, positions, bucket_frequencies(rotary, scaling, factor_a),
                                         bucket_frequencies(rotary, scaling, factor_b), head_size=64)):
        before = cached.view(-1, KV_HEADS, 2, 32).double().norm(dim=2)  # NeoX pair (j, j + 32)
        after = converted.view(-1, KV_HEADS, 2, 32).double().norm(dim=2)
        assert torch.allclose(after, before * ratio, rtol=8 * EPS, atol=8 * EPS * before.max().item())
    # With attention factors, one conversion scales pair norms by m_b / m_a, not by its square nor by 1.
    assert ratio != 1.0 and abs(ratio * ratio - ratio) > 1e-3


def test_conversions_compose_and_invert() -> None:
    _, _, tables = setup("dynamic_yarn", 64)
    positions = positions_grid()
    cached = rotate_at(tables, 1.0, raw_keys(positions.numel(), 64, torch.float32), positions, 64, True)
    via_2 = rerotate(rerotate(cached, positions, delta_table(tables, 1.0, 2.0), head_size=64), positions,
                     delta_table(tables, 2.0, 8.0), head_size=64)
    direct = rerotate(cached, positions, delta_table(tables, 1.0, 8.0), head_size=64)
    back = rerotate(direct, positions, delta_table(tables, 8.0, 1.0), head_size=64)
    bound = 8 * EPS * max_abs(cached, direct)
    assert (via_2 - direct).abs().max().item() <= bound
    assert (back - cached).abs().max().item() <= bound


@pytest.mark.parametrize("layout", ["flat", "heads"])
def test_pass_through_dims_are_untouched_and_shapes_kept(layout) -> None:
    _, _, tables = setup("dynamic_yarn", 32)
    positions = positions_grid()
    keys = raw_keys(positions.numel(), 64, torch.float32)
    if layout == "heads":
        keys = keys.view(-1, KV_HEADS, 64)
    out = rerotate(keys, positions, delta_table(tables, 1.0, 4.0), head_size=64)
    assert out.shape == keys.shape
    assert torch.equal(out.reshape(-1, KV_HEADS, 64)[..., 32:], keys.reshape(-1, KV_HEADS, 64)[..., 32:])
    assert not torch.equal(out.reshape(-1, KV_HEADS, 64)[..., :32], keys.reshape(-1, KV_HEADS, 64)[..., :32])
    assert torch.equal(keys, raw_keys(positions.numel(), 64, torch.float32).view(keys.shape))  # input kept


def test_delta_rows_of_arbitrary_tables_rotate_by_the_angle_difference() -> None:
    angles_a = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    angles_b = torch.tensor([[1.1, 2.0]], dtype=torch.float64)
    rows_a = 1.5 * torch.cat((angles_a.cos(), angles_a.sin()), dim=-1)
    rows_b = 2.0 * torch.cat((angles_b.cos(), angles_b.sin()), dim=-1)
    expected = (2.0 / 1.5) * torch.cat(((angles_b - angles_a).cos(), (angles_b - angles_a).sin()), dim=-1)
    assert torch.allclose(delta_rows(rows_a, rows_b).double(), expected, atol=1e-6, rtol=0)


def test_invalid_inputs_raise_typed_errors() -> None:
    _, _, tables = setup("dynamic_yarn", 64)
    delta = delta_table(tables, 1.0, 2.0, num_rows=16)
    assert delta.shape == (16, 64)
    with pytest.raises(RopeConfigError):
        delta_table(tables, 1.0, 3.0)  # not a bucket
    with pytest.raises(RopeConfigError):
        delta_table(tables, 1.0, 2.0, num_rows=tables.rows_per_bucket + 1)
    with pytest.raises(RopeConfigError):
        delta_rows(delta[:4], delta[:5])
    with pytest.raises(RopeConfigError):
        rotate_keys(torch.zeros(4, 100), delta[:4], head_size=64)  # 64 does not divide 100
    with pytest.raises(RopeConfigError):
        rotate_keys(torch.zeros(4, 32), delta[:4], head_size=32)  # rotary_dim 64 > head_size 32


# --- vLLM's own rotary code (imported lazily; -m "not vllm" skips) ------------------------------------

@pytest.fixture(scope="module")
def vllm_ops():
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    return ops, RotaryEmbedding


@pytest.mark.vllm
@pytest.mark.parametrize(("head_size", "rotary_dim"), HEADS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotate_keys_is_vllm_rotation_bit_for_bit(vllm_ops, head_size, rotary_dim, is_neox) -> None:
    """Our layout conventions are vLLM's: forward_static's keys, float32, exactly."""
    _, rotary_embedding = vllm_ops
    _, _, tables = setup("dynamic_yarn", rotary_dim)
    positions = positions_grid()
    keys = raw_keys(positions.numel(), head_size, torch.float32)
    query = torch.zeros(positions.numel(), head_size)
    _, expected = rotary_embedding.forward_static(positions + tables.row_offset(4.0), query, keys.clone(),
                                                  head_size, rotary_dim, tables.cos_sin_cache, is_neox)
    assert torch.equal(rotate_at(tables, 4.0, keys, positions, head_size, is_neox), expected)


@pytest.mark.vllm
@pytest.mark.parametrize(("head_size", "rotary_dim"), HEADS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("factor_a", "factor_b"), [(1.0, 2.0), (2.0, 8.0), (8.0, 1.0)])
def test_stock_vllm_kernel_with_a_delta_table_equals_the_fast_path(vllm_ops, head_size, rotary_dim, is_neox,
                                                                    dtype, factor_a, factor_b) -> None:
    """``ops.rotary_embedding`` on the keys alone (passed as its query), with the delta table as its
    cos/sin cache in the keys' dtype, converts in place: the CPU kernel here; CUDA's has the same contract."""
    ops, _ = vllm_ops
    _, _, tables = setup("dynamic_yarn", rotary_dim)
    positions = positions_grid()
    keys = raw_keys(positions.numel(), head_size, dtype)
    cached = rotate_at(tables, factor_a, keys, positions, head_size, is_neox)
    delta = delta_table(tables, factor_a, factor_b)
    fast = rerotate(cached, positions, delta, head_size=head_size, is_neox=is_neox)
    in_place = cached.clone()
    ops.rotary_embedding(positions, in_place, None, head_size, delta.to(dtype), is_neox)
    fresh = rotate_at(tables, factor_b, keys, positions, head_size, is_neox)
    tolerance = (4 * EPS if dtype == torch.float32 else 2 ** -6) * max_abs(cached, fresh)
    assert (in_place.float() - fast.float()).abs().max().item() <= tolerance
    assert (in_place.float() - fresh.float()).abs().max().item() <= tolerance
