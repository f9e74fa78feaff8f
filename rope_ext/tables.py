"""cos/sin tables in vLLM's layout, one per scale bucket, stacked for per-request scaling.

vLLM's rotary kernels (CPU and CUDA, ``ops.rotary_embedding``) read row ``p`` of ``cos_sin_cache``
(shape ``[rows, rotary_dim]``: first half cos, second half sin) for a token at position ``p``. Stacking
one table per bucket along dim 0 and adding ``bucket_index * rows_per_bucket`` to each token's position
gives every request its own scale with the stock kernel. Rows are computed exactly as vLLM 0.32.0 does
(``einsum`` of float32 positions and inverse frequencies, cos/sin, times the attention factor).
"""

from __future__ import annotations

import dataclasses

import torch

from rope_ext.config import RopeScaling, RotaryConfig, format_factor
from rope_ext.errors import RopeConfigError
from rope_ext.methods import RopeFrequencies, bucket_method, compute_frequencies, default


def cos_sin_rows(frequencies: RopeFrequencies, num_rows: int) -> torch.Tensor:
    """Rows ``0..num_rows-1`` of a float32 cos/sin table (vLLM layout)."""
    inv_freq, attention_factor = frequencies
    positions = torch.arange(num_rows, dtype=torch.float32)
    freqs = torch.einsum("i,j -> ij", positions, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat((cos, sin), dim=-1)


def bucket_frequencies(rotary: RotaryConfig, scaling: RopeScaling, factor: float) -> RopeFrequencies:
    """The frequencies of a bucket: plain RoPE (attention factor exactly 1) at s = 1, else the method's
    static equivalent at s. At s = 1 YaRN's blend would round differently from plain RoPE, and a request
    at or below L must be computed exactly as the unscaled model. LongRoPE's bucket 1 is its own
    short-factor table: the model at its original context."""
    if factor == 1 and scaling.method != "longrope":
        return default(rotary, scaling)
    return compute_frequencies(bucket_method(scaling.method), rotary, scaling, factor)


@dataclasses.dataclass(frozen=True)
class BucketTables:
    """Stacked cos/sin tables: bucket k occupies rows ``[k * rows_per_bucket, (k+1) * rows_per_bucket)``."""

    factors: tuple[float, ...]
    rows_per_bucket: int
    cos_sin_cache: torch.Tensor

    def bucket_index(self, factor: float) -> int:
        try:
            return self.factors.index(float(factor))
        except ValueError:
            raise RopeConfigError("factor", f"{format_factor(factor)} is not a bucket; buckets: "
                                  f"{', '.join(map(format_factor, self.factors))}") from None

    def row_offset(self, factor: float) -> int:
        """The row at which the table of bucket ``factor`` starts."""
        return self.bucket_index(factor) * self.rows_per_bucket

    @property
    def nbytes(self) -> int:
        return self.cos_sin_cache.numel() * self.cos_sin_cache.element_size()


def build_bucket_tables(rotary: RotaryConfig, scaling: RopeScaling, *, rows_per_bucket: int | None = None,
                        dtype: torch.dtype = torch.float32) -> BucketTables:
    """One table per bucket of ``scaling``, each ``rows_per_bucket`` rows (default: the served context, so
    a request that outgrows its bucket still finds its rows), stacked and cast to ``dtype``."""
    rows = scaling.max_context if rows_per_bucket is None else rows_per_bucket
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        raise RopeConfigError("rows_per_bucket", f"must be an integer > 0 (got {rows!r})")
    tables = [cos_sin_rows(bucket_frequencies(rotary, scaling, s), rows) for s in scaling.buckets]
    return BucketTables(tuple(scaling.buckets), rows, torch.cat(tables, dim=0).to(dtype))


def table_nbytes(rotary: RotaryConfig, scaling: RopeScaling, dtype: torch.dtype = torch.float32) -> int:
    """Memory of :func:`build_bucket_tables`' result, without building it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return len(scaling.buckets) * scaling.max_context * rotary.rotary_dim * itemsize


__all__ = ["BucketTables", "build_bucket_tables", "bucket_frequencies", "cos_sin_rows", "table_nbytes"]
