"""Parity of rope_ext's frequencies with transformers 5.19's reference functions (``modeling_rope_utils``).

rope_ext does the same float32 arithmetic as transformers for linear, Dynamic NTK, YaRN and LongRoPE
(``base ** (arange(0, d, 2) / d)``, the same blend order), so the inverse frequencies must be identical
(max abs difference 0) and the attention factor equal, over a grid of head dims, bases, original contexts
L, scales s (integer and fractional), truncation and DeepSeek-style mscale settings.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import (
    _compute_dynamic_ntk_parameters,
    _compute_linear_scaling_rope_parameters,
    _compute_longrope_parameters,
    _compute_yarn_parameters,
)

from rope_ext import RopeScaling, RotaryConfig, compute_frequencies

HEAD_DIMS = (64, 128)
THETAS = (1e4, 1e5, 1e6)
CONTEXTS = (2048, 4096, 8192, 32768)
FACTORS = (1, 1.5, 2, 2.5, 4, 8, 16, 32)
GRID = list(itertools.product(HEAD_DIMS, THETAS, CONTEXTS, FACTORS))


def test_pinned_transformers_version() -> None:
    # The expectations below were read from this version's source; a different one must be re-checked.
    assert transformers.__version__.startswith("5.19."), transformers.__version__


def hf_config(head_dim: int, theta: float, max_position: int, **rope: object) -> transformers.LlamaConfig:
    """A tiny Llama config (no weights are ever built) carrying ``rope_parameters``."""
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, num_hidden_layers=1,
        intermediate_size=8, vocab_size=16, max_position_embeddings=max_position,
        rope_parameters={"rope_theta": theta, **rope},
    )


def scaling_for(method: str, L: int, **kwargs: object) -> RopeScaling:
    return RopeScaling(method=method, original_max_position=L, max_factor=32.0, **kwargs)


def assert_same(reference: tuple[torch.Tensor, float], ours: tuple[torch.Tensor, float]) -> None:
    ref_inv, ref_attention = reference
    inv, attention = ours
    assert inv.dtype == ref_inv.dtype == torch.float32
    assert inv.shape == ref_inv.shape
    assert (inv - ref_inv).abs().max().item() == 0.0
    assert attention == ref_attention


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize(("head_dim", "theta", "L", "s"), GRID)
def test_yarn_matches_transformers(head_dim: int, theta: float, L: int, s: float, truncate: bool) -> None:
    config = hf_config(head_dim, theta, L, rope_type="yarn", factor=float(s),
                       original_max_position_embeddings=L, truncate=truncate)
    ours = compute_frequencies("yarn", RotaryConfig(head_dim, theta), scaling_for("yarn", L, truncate=truncate), s)
    assert_same(_compute_yarn_parameters(config), ours)


@pytest.mark.parametrize(("head_dim", "theta", "L", "s"), GRID)
def test_linear_matches_transformers(head_dim: int, theta: float, L: int, s: float) -> None:
    config = hf_config(head_dim, theta, L, rope_type="linear", factor=float(s))
    ours = compute_frequencies("linear", RotaryConfig(head_dim, theta), scaling_for("linear", L), s)
    assert_same(_compute_linear_scaling_rope_parameters(config), ours)


@pytest.mark.parametrize(("head_dim", "theta", "L", "s"), GRID)
def test_dynamic_ntk_matches_transformers(head_dim: int, theta: float, L: int, s: float) -> None:
    # transformers' Dynamic NTK reads L from max_position_embeddings; lengths below L mean plain RoPE.
    config = hf_config(head_dim, theta, L, rope_type="dynamic", factor=float(s))
    rotary, scaling = RotaryConfig(head_dim, theta), scaling_for("dynamic_ntk", L)
    for seq_len in (None, L // 2, L, L + 1, 2 * L, int(L * s), 3 * L + 7):
        ours = compute_frequencies("dynamic_ntk", rotary, scaling, s, seq_len=seq_len)
        assert_same(_compute_dynamic_ntk_parameters(config, seq_len=seq_len), ours)


MSCALE_CASES = [
    # (mscale, mscale_all_dim, attention_factor): DeepSeek-V3 style ratios, one factor, an explicit override.
    (1.0, 1.0, None),
    (0.707, 0.707, None),
    (1.0, 0.0, None),  # mscale_all_dim falsy: the plain 0.1 ln(s) + 1
    (1.0, 0.5, None),
    (0.5, 1.0, None),
    (None, None, 1.0),
    (None, None, 0.75),
    (1.0, 0.5, 1.25),  # an explicit attention_factor overrides the ratio
]


@pytest.mark.parametrize(("mscale", "mscale_all_dim", "attention_factor"), MSCALE_CASES)
@pytest.mark.parametrize("s", [1, 2.5, 4, 40])
@pytest.mark.parametrize(("head_dim", "theta", "L"), [(64, 1e5, 8192), (128, 1e4, 4096)])
def test_yarn_attention_factor_matches_transformers(head_dim: int, theta: float, L: int, s: float,
                                                    mscale: float | None, mscale_all_dim: float | None,
                                                    attention_factor: float | None) -> None:
    extra = {k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim),
                                ("attention_factor", attention_factor)) if v is not None}
    config = hf_config(head_dim, theta, L, rope_type="yarn", factor=float(s),
                       original_max_position_embeddings=L, **extra)
    scaling = RopeScaling(method="yarn", original_max_position=L, max_factor=64.0, **extra)
    ours = compute_frequencies("yarn", RotaryConfig(head_dim, theta), scaling, s)
    assert_same(_compute_yarn_parameters(config), ours)


def test_yarn_beta_knobs_match_transformers() -> None:
    config = hf_config(64, 1e5, 8192, rope_type="yarn", factor=8.0, original_max_position_embeddings=8192,
                       beta_fast=16, beta_slow=2)
    scaling = RopeScaling(method="yarn", original_max_position=8192, max_factor=8.0, beta_fast=16, beta_slow=2)
    assert_same(_compute_yarn_parameters(config), compute_frequencies("yarn", RotaryConfig(64, 1e5), scaling, 8))


@pytest.mark.parametrize(("head_dim", "L", "max_position"), [(64, 4096, 131072), (96, 4096, 131072), (128, 2048, 8192)])
@pytest.mark.parametrize("theta", [1e4, 5e5])
def test_longrope_matches_transformers(head_dim: int, L: int, max_position: int, theta: float) -> None:
    """Short factors up to L, long factors past it, the attention factor from max_position / L: transformers
    chooses per forward by the current length, rope_ext by the bucket (1: short, the largest: long)."""
    half = head_dim // 2
    rope = {"rope_type": "longrope", "original_max_position_embeddings": L,
            "short_factor": [1.0 + 0.01 * i for i in range(half)], "long_factor": [1.0 + 1.7 * i for i in range(half)]}
    config = transformers.Phi3Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
                                     num_hidden_layers=1, intermediate_size=8, vocab_size=16,
                                     max_position_embeddings=max_position, original_max_position_embeddings=L,
                                     rope_parameters={"rope_theta": theta, **rope})
    scaling = RopeScaling.from_rope_parameters(config.rope_parameters, max_position_embeddings=max_position)
    rotary = RotaryConfig(head_dim, theta)
    for seq_len, factor in ((None, 1.0), (L, 1.0), (L + 1, scaling.max_factor), (max_position, scaling.max_factor)):
        reference = _compute_longrope_parameters(config, "cpu", seq_len)
        assert_same(reference, compute_frequencies("longrope", rotary, scaling, factor))
        assert_same(reference, compute_frequencies("longrope", rotary, scaling, 1.0, seq_len=seq_len))
