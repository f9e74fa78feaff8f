"""Re-rotating cached keys from one RoPE scale to another: a plain reference and a one-rotation fast path.

Engines cache keys after RoPE. For rotary pair i of a key at position p, cached at scale s_a,

    k_a = m_a * R(theta_a[i] * p) k        (m = the table's attention factor, R a 2-D rotation)

To continue the request at scale s_b the key must become ``k_b = m_b * R(theta_b[i] * p) k``; the
values and the dims past ``rotary_dim`` are untouched. Two ways to get there:

- :func:`rerotate_reference`, the oracle: un-rotate by the old angle, divide out m_a, rotate by the new
  angle, multiply by m_b; in float64, from the two scales' frequencies.
- :func:`rerotate`, the fast path: one rotation by the angle difference, scaled once,
  ``k_b = (m_b / m_a) * R(delta) k_a``, reading rows of a *delta table* (:func:`delta_rows`,
  :func:`delta_table`) laid out exactly as vLLM's ``cos_sin_cache``: first half ``(m_b/m_a) cos(delta)``,
  second half ``(m_b/m_a) sin(delta)``. vLLM's stock kernel therefore does the conversion too:
  ``ops.rotary_embedding(positions, keys, None, head_size, delta.to(keys.dtype), is_neox)`` with the keys
  passed as its query (tested on the CPU kernel; the CUDA kernel has the same contract but has not been
  run here; used by ``rope_ext.vllm_plugin.regrow`` with float32 keys and table).

Why the delta rows are a quotient of table rows: a row of a cos/sin table is the complex number
``z = m (cos t + i sin t)`` with t the angle *as the table rounded it* (float32 ``p * inv_freq``, as vLLM
computes it). ``z_b / z_a``, computed in float64 from the two rows the engine actually used, rotates from
exactly the angle the old table applied to exactly the angle the new one applies (at p = 65535 the
float32 angle is off the true one by ~4e-3 rad, so a delta from true angles would not compose), and its
modulus is ``m_b / m_a``: the magnitude ratio enters once. For ``s_a == s_b`` the quotient is exactly
``1 + 0i`` and the conversion is the identity, bit for bit.

Layouts (vLLM's): keys ``[tokens, heads * head_size]`` or ``[tokens, heads, head_size]``, the first
``rotary_dim`` dims of each head rotated; NeoX style pairs dim ``j`` with ``j + rotary_dim/2``, GPT-J
style pairs ``2j`` with ``2j + 1``. Positions are absolute token positions (table rows). Imports torch
only.
"""

from __future__ import annotations

import torch

from rope_ext.errors import RopeConfigError
from rope_ext.methods import RopeFrequencies
from rope_ext.tables import BucketTables


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads(keys: torch.Tensor, head_size: int) -> torch.Tensor:
    """``keys`` viewed as ``[tokens, heads, head_size]``."""
    if keys.shape[-1] % head_size:
        raise RopeConfigError("head_size", f"{head_size} does not divide the key width {keys.shape[-1]}")
    return keys.reshape(keys.shape[0], -1, head_size)


def _halves(x: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of every rotary pair of ``x`` (last dim = rotary_dim)."""
    if is_neox:
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def _join(o1: torch.Tensor, o2: torch.Tensor, is_neox: bool) -> torch.Tensor:
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """``x`` ([tokens, heads, rotary_dim]) with each pair multiplied by ``cos + i sin`` ([tokens, rotary_dim/2])."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = _halves(x, is_neox)
    return _join(x1 * cos - x2 * sin, x2 * cos + x1 * sin, is_neox)


def _check_rows(rows: torch.Tensor, num_tokens: int, head_size: int) -> int:
    rotary_dim = rows.shape[-1]
    if rows.dim() != 2 or rows.shape[0] != num_tokens:
        raise RopeConfigError("rows", f"must be [{num_tokens}, rotary_dim] (got {list(rows.shape)})")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise RopeConfigError("rotary_dim", f"must be even and in (0, head_size={head_size}] (got {rotary_dim})")
    return rotary_dim


def rotate_keys(keys: torch.Tensor, rows: torch.Tensor, *, head_size: int, is_neox: bool = True) -> torch.Tensor:
    """Keys rotated by one cos/sin row per token (``rows``: ``[tokens, rotary_dim]``, vLLM's row layout).

    Computed in float32 (float64 for float64 keys) and rounded once to the keys' dtype; a new tensor of
    the keys' shape. With rows of a scale's table this is RoPE at that scale (what vLLM's
    ``forward_native`` does to keys); with delta rows it is the fast re-rotation."""
    heads = _heads(keys, head_size)
    rotary_dim = _check_rows(rows, heads.shape[0], head_size)
    dtype = _compute_dtype(keys.dtype)
    rows = rows.to(device=keys.device, dtype=dtype)
    cos, sin = rows[:, : rotary_dim // 2], rows[:, rotary_dim // 2:]
    rotated = _rotate_pairs(heads[..., :rotary_dim].to(dtype), cos, sin, is_neox).to(keys.dtype)
    out = torch.cat((rotated, heads[..., rotary_dim:]), dim=-1) if rotary_dim < head_size else rotated
    return out.reshape(keys.shape)


def delta_rows(rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
    """Delta-table rows (float32, vLLM layout) taking keys rotated with ``rows_a`` to ``rows_b``.

    Row by row and pair by pair the complex quotient ``z_b / z_a`` of the two tables' entries
    (``z = cos_entry + i sin_entry``, attention factors included), computed in float64: a rotation by
    the angle difference with modulus ``m_b / m_a``."""
    if rows_a.shape != rows_b.shape or rows_a.dim() != 2 or rows_a.shape[-1] % 2:
        raise RopeConfigError("rows", f"need two [n, rotary_dim] tables of one shape (got {list(rows_a.shape)}, "
                                      f"{list(rows_b.shape)})")
    half = rows_a.shape[-1] // 2
    a, b = rows_a.to(torch.float64), rows_b.to(torch.float64)
    ca, sa, cb, sb = a[:, :half], a[:, half:], b[:, :half], b[:, half:]
    norm = ca * ca + sa * sa  # m_a^2 (exactly the row's own modulus, float32 rounding included)
    cos = (cb * ca + sb * sa) / norm
    sin = (sb * ca - cb * sa) / norm
    return torch.cat((cos, sin), dim=-1).to(torch.float32)


def delta_table(tables: BucketTables, factor_a: float, factor_b: float, num_rows: int | None = None) -> torch.Tensor:
    """The delta table from bucket ``factor_a`` to bucket ``factor_b`` of stacked ``tables``: rows for
    positions ``0 .. num_rows-1`` (default: every row of a bucket), float32."""
    rows = tables.rows_per_bucket if num_rows is None else num_rows
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows <= tables.rows_per_bucket:
        raise RopeConfigError("num_rows", f"must be an integer in [1, {tables.rows_per_bucket}] (got {rows!r})")
    start_a, start_b = tables.row_offset(factor_a), tables.row_offset(factor_b)
    cache = tables.cos_sin_cache
    return delta_rows(cache[start_a:start_a + rows], cache[start_b:start_b + rows])


def rerotate(keys: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor, *, head_size: int,
             is_neox: bool = True) -> torch.Tensor:
    """Fast path: keys cached at scale s_a, at ``positions``, converted to s_b by one rotation per pair
    with rows ``delta[positions]`` of a delta table (:func:`delta_table`). A new tensor, keys' dtype."""
    positions = positions.reshape(-1).to(device=delta.device, dtype=torch.long)
    return rotate_keys(keys, delta.index_select(0, positions), head_size=head_size, is_neox=is_neox)


def _angles(frequencies: RopeFrequencies, positions: torch.Tensor) -> torch.Tensor:
    """Angles as vLLM's tables round them: the float32 product ``position * inv_freq``, then float64."""
    inv_freq = frequencies.inv_freq.to(torch.float32).cpu()
    product = positions.reshape(-1).cpu().to(torch.float32)[:, None] * inv_freq[None, :]
    return product.to(torch.float64)


def rerotate_reference(keys: torch.Tensor, positions: torch.Tensor, frequencies_a: RopeFrequencies,
                       frequencies_b: RopeFrequencies, *, head_size: int, is_neox: bool = True) -> torch.Tensor:
    """Reference: keys cached at scale a (``frequencies_a``: inverse frequencies and attention factor)
    converted to scale b in two plain steps, in float64: un-rotate by the old angle and divide out the
    old attention factor, then rotate by the new angle and multiply in the new one."""
    heads = _heads(keys, head_size)
    rotary_dim = 2 * frequencies_a.inv_freq.numel()
    if frequencies_b.inv_freq.numel() * 2 != rotary_dim or not 0 < rotary_dim <= head_size:
        raise RopeConfigError("rotary_dim", f"frequencies disagree with each other or head_size={head_size}")
    angle_a, angle_b = _angles(frequencies_a, positions), _angles(frequencies_b, positions)
    x = heads[..., :rotary_dim].to(torch.float64).cpu()
    plain = _rotate_pairs(x, angle_a.cos(), -angle_a.sin(), is_neox) / frequencies_a.attention_factor
    converted = _rotate_pairs(plain, angle_b.cos(), angle_b.sin(), is_neox) * frequencies_b.attention_factor
    converted = converted.to(device=keys.device, dtype=keys.dtype)
    out = torch.cat((converted, heads[..., rotary_dim:]), dim=-1) if rotary_dim < head_size else converted
    return out.reshape(keys.shape)


__all__ = ["delta_rows", "delta_table", "rerotate", "rerotate_reference", "rotate_keys"]
