"""A vLLM rotary embedding whose scale is chosen per request.

The cos/sin table holds one table per scale bucket, stacked (``rope_ext.build_bucket_tables``). Before
each forward step the model runner writes, for every token of the flat batch, the row offset of its
request's bucket into ``token_offsets`` (:mod:`rope_ext.vllm_plugin.runner`). Every forward path adds
that offset to the positions and hands them to the stock implementation: the CPU and CUDA kernels
(``ops.rotary_embedding``) and the plain-torch ``forward_native`` all index rows of one table, so no
kernel changes. ``positions`` itself is never modified, so slot mapping and attention are untouched.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from rope_ext import RopeScaling, RotaryConfig, build_bucket_tables


class PerRequestRotaryEmbedding(RotaryEmbedding):
    """RoPE with a per-request scale: bucket tables stacked, addressed by a per-token row offset."""

    def __init__(self, head_size: int, rotary_dim: int, base: float, is_neox_style: bool,
                 dtype: torch.dtype, *, scaling: RopeScaling, rows_per_bucket: int, max_num_tokens: int) -> None:
        self.scaling = scaling
        self.rows_per_bucket = rows_per_bucket
        super().__init__(head_size, rotary_dim, rows_per_bucket, base, is_neox_style, dtype)
        # Row offset of each token's bucket, filled by the model runner before every step. Zero rows
        # mean bucket 0 (scale 1, plain RoPE): dummy and warm-up runs read valid rows.
        self.token_offsets: torch.Tensor
        self.register_buffer("token_offsets", torch.zeros(max_num_tokens, dtype=torch.long), persistent=False)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        rotary = RotaryConfig(rotary_dim=self.rotary_dim, base=self.base)
        return build_bucket_tables(rotary, self.scaling, rows_per_bucket=self.rows_per_bucket).cos_sin_cache

    def row_offset(self, factor: float) -> int:
        """First row of the table of bucket ``factor``."""
        return self.scaling.buckets.index(float(factor)) * self.rows_per_bucket

    def _offset(self, positions: torch.Tensor) -> torch.Tensor:
        return positions + self.token_offsets[: positions.shape[-1]]

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
