"""vLLM rotary embeddings whose scale is chosen per request.

The cos/sin table holds one table per scale bucket, stacked (``rope_ext.build_bucket_tables``). Before
each forward step the model runner writes, for every token of the flat batch, the row offset of its
request's bucket into ``token_offsets`` (:mod:`rope_ext.vllm_plugin.runner`). Every forward path adds
that offset to the positions and hands them to the stock implementation, so no kernel changes and
``positions`` itself is never modified (slot mapping and attention are untouched):

- :class:`PerRequestRotaryEmbedding` (YaRN, NTK, linear buckets) subclasses vLLM's ``RotaryEmbedding``: the
  CPU and CUDA kernels (``ops.rotary_embedding``) and the plain-torch ``forward_native`` all index rows of
  one table.
- :class:`PerRequestLongRope` (LongRoPE, Phi-3) subclasses vLLM's ``Phi3LongRoPEScaledRotaryEmbedding``,
  whose forward already reads a stacked short + long table at ``positions + offsets``: the short-factor
  table is bucket 1, the long-factor table the largest bucket, and the offsets choose per request what
  stock vLLM chooses once per engine.
- :class:`PerRequestMRotaryEmbedding` (multimodal RoPE: Qwen3-VL, Qwen3.5) subclasses vLLM's
  ``MRotaryEmbedding``: its positions are ``[3, num_tokens]`` (temporal, height, width; equal rows for
  text), each row indexing the same table before the sections (interleaved or chunked) are picked, so one
  per-token offset added to all three rows moves each token to its bucket's table.

All three are :class:`PerRequestRows`, which is all the runner, the checks and re-rotation read. A layer that
would hand its rotary table and the raw positions to a fused kernel instead of calling its rotary module
has that kernel turned off (:func:`unfuse`), so its tokens go through the offsets too.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.rotary_embedding import (
    MRotaryEmbedding,
    RotaryEmbedding,
)
from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
    Phi3LongRoPEScaledRotaryEmbedding,
)

from rope_ext import RopeScaling, RotaryConfig, build_bucket_tables


class PerRequestRows:
    """A rotary module with stacked bucket tables (``cos_sin_cache``, ``rows_per_bucket`` rows each) and the
    per-token row offsets buffer the runner fills."""

    scaling: RopeScaling
    rows_per_bucket: int
    token_offsets: torch.Tensor
    cos_sin_cache: torch.Tensor

    def _register_offsets(self, max_num_tokens: int) -> None:
        # Row offset of each token's bucket, filled by the model runner before every step. Zero rows
        # mean bucket 0 (scale 1): dummy and warm-up runs read valid rows.
        self.register_buffer("token_offsets", torch.zeros(max_num_tokens, dtype=torch.long), persistent=False)

    def _tables(self, rotary_dim: int, base: float) -> torch.Tensor:
        rotary = RotaryConfig(rotary_dim=rotary_dim, base=base)
        return build_bucket_tables(rotary, self.scaling, rows_per_bucket=self.rows_per_bucket).cos_sin_cache

    def row_offset(self, factor: float) -> int:
        """First row of the table of bucket ``factor``."""
        return self.scaling.buckets.index(float(factor)) * self.rows_per_bucket

    def _offset(self, positions: torch.Tensor) -> torch.Tensor:
        return positions + self.token_offsets[: positions.shape[-1]]


class PerRequestRotaryEmbedding(PerRequestRows, RotaryEmbedding):
    """RoPE with a per-request scale: bucket tables stacked, addressed by a per-token row offset."""

    def __init__(self, head_size: int, rotary_dim: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype, *, scaling: RopeScaling, rows_per_bucket: int, max_num_tokens: int) -> None:
        self.scaling = scaling
        self.rows_per_bucket = rows_per_bucket
        super().__init__(head_size, rotary_dim, rows_per_bucket, base, is_neox_style, dtype)
        self._register_offsets(max_num_tokens)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return self._tables(self.rotary_dim, self.base)

    def forward_native(self, positions, query, key=None):
        return super().forward_native(self._offset(positions), query, key)

    def forward_cpu(self, positions, query, key=None):
        return super().forward_cpu(self._offset(positions), query, key)

    def forward_cuda(self, positions, query, key=None):
        return super().forward_cuda(self._offset(positions), query, key)

    # The base class's HIP and XPU paths fall back to forward_cuda / forward_native, which offset
    # already: offset exactly once.
    def forward_hip(self, positions, query, key=None):
        if self.use_aiter:
            return super().forward_hip(self._offset(positions), query, key)
        return self.forward_cuda(positions, query, key)

    def forward_xpu(self, positions, query, key=None):
        if key is None:
            return self.forward_native(positions, query, key)
        return super().forward_xpu(self._offset(positions), query, key)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, method={self.scaling.method}, buckets={list(self.scaling.buckets)}, "
                f"original_max_position={self.scaling.original_max_position}")


class PerRequestLongRope(PerRequestRows, Phi3LongRoPEScaledRotaryEmbedding):
    """LongRoPE with the table chosen per request: stock vLLM's forward, its ``offsets`` the runner's.

    The stacked table replaces stock's ``long_short_cos_sin_cache`` (short rows ``[0, L)`` then long rows);
    both lists' rows are computed as stock computes them (``rope_ext.methods.longrope``), each table
    ``rows_per_bucket`` long, so a short request that generates past L keeps its short factors."""

    def __init__(self, head_size: int, rotary_dim: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype, *, scaling: RopeScaling, rows_per_bucket: int, max_num_tokens: int) -> None:
        if not is_neox_style:
            raise ValueError("`Phi3LongRoPEScaledRotaryEmbedding` only supports neox_style.")  # as stock says
        # Stock's __init__ would build its own tables and choose one for the engine (its use_long_rope, with a
        # warning about short sequences that does not apply here): set what its forward reads instead.
        nn.Module.__init__(self)
        self.scaling = scaling
        self.rows_per_bucket = rows_per_bucket
        self.head_size, self.rotary_dim, self.base = head_size, rotary_dim, base
        self.original_max_position_embeddings = scaling.original_max_position
        self.max_position_embeddings = scaling.max_context
        self.short_factor, self.long_factor = list(scaling.short_factor), list(scaling.long_factor)
        self.use_long_rope = False  # the offsets choose the table
        self.register_buffer("long_short_cos_sin_cache", self._tables(rotary_dim, base).to(dtype), persistent=False)
        self._register_offsets(max_num_tokens)

    @property
    def cos_sin_cache(self) -> torch.Tensor:
        return self.long_short_cos_sin_cache

    def forward(self, positions, query, key=None, offsets=None):
        _no_offsets(offsets)
        return super().forward(positions, query, key, offsets=self.token_offsets[: positions.shape[-1]])

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, base={self.base}, method=longrope, "
                f"buckets={list(self.scaling.buckets)}, original_max_position={self.scaling.original_max_position}")


class PerRequestMRotaryEmbedding(PerRequestRows, MRotaryEmbedding):
    """Multimodal RoPE with a per-request scale: stock ``MRotaryEmbedding``'s forward at offset positions.

    Stock sizes its table ``positions_factor`` times the context (video pruning keeps the positions of the
    tokens it drops, so positions may run past the token count); each bucket's table here is as long, so a
    position never reads the next bucket's rows. YaRN's frequency ramp is computed over the original context
    L, as for text models; stock's static YaRN mRoPE computes it over ``positions_factor`` x L (its table
    length), so with a positions factor above 1 (video pruning) the two differ in the ramp's low frequencies,
    and with 1 (Qwen3-VL, Qwen3.5 without pruning) they are equal (``tests/plugin/test_rotary_unit.py``)."""

    def __init__(self, head_size: int, rotary_dim: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype, *, scaling: RopeScaling, rows_per_bucket: int, max_num_tokens: int,
                 mrope_section: list[int], mrope_interleaved: bool, positions_factor: int) -> None:
        self.scaling = scaling
        self.rows_per_bucket = rows_per_bucket * positions_factor
        super().__init__(head_size, rotary_dim, rows_per_bucket, base, is_neox_style, dtype,
                         mrope_section=list(mrope_section), mrope_interleaved=mrope_interleaved,
                         positions_factor=positions_factor)  # no scaling_factor: the tables carry YaRN's
        self._register_offsets(max_num_tokens)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return self._tables(self.rotary_dim, self.base)

    # forward_cpu calls forward_native and forward_xpu forward_cuda, which offset: offset exactly once.
    def forward_native(self, positions, query, key=None, offsets=None):
        _no_offsets(offsets)
        return super().forward_native(self._offset(positions), query, key)

    def forward_cuda(self, positions, query, key=None, offsets=None):
        _no_offsets(offsets)
        return super().forward_cuda(self._offset(positions), query, key)

    def forward_hip(self, positions, query, key=None, offsets=None):
        _no_offsets(offsets)
        if positions.ndim == 2:  # stock's fused mRoPE op
            return super().forward_hip(self._offset(positions), query, key)
        return self.forward_cuda(positions, query, key)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mrope_section={self.mrope_section}, interleaved={self.mrope_interleaved}, "
                f"method={self.scaling.method}, buckets={list(self.scaling.buckets)}, "
                f"original_max_position={self.scaling.original_max_position}")


def _no_offsets(offsets) -> None:
    if offsets is not None:
        raise ValueError("the per-request rotary module takes its offsets from the plugin's runner")


# Attention-layer flags that route RoPE through a fused kernel reading ``rotary_emb.cos_sin_cache`` at the raw
# positions: Qwen3NextAttention's QK-RMSNorm + RoPE + gate (Qwen3-Next, Qwen3.5), on CUDA and XPU in bf16/fp16.
FUSED_ROPE_FLAGS = ("use_fused_qk_norm_rope_gate",)


def unfuse(model: nn.Module) -> list[str]:
    """Turn off :data:`FUSED_ROPE_FLAGS` in every layer whose rotary embedding is per request (the layer then
    runs its own norms and ``rotary_emb(positions, q, k)``, which adds the offsets). Call it after the model is
    built and before it is compiled. Returns the flags turned off, as ``layer.flag``."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "rotary_emb", None), PerRequestRows):
            for flag in FUSED_ROPE_FLAGS:
                if getattr(module, flag, False):
                    setattr(module, flag, False)
                    changed.append(f"{name}.{flag}")
    return changed
