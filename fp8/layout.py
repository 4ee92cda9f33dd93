"""The grouped GEMMs' row layouts: DeepGEMM's 128-aligned contiguous groups, and masked groups.

Contiguous layout (`m_grouped_gemm_nt_contiguous`): the rows of all groups are stacked into
one `[m_sum, k]` array. Each group's rows are contiguous and start on a multiple of 128, and
the gap up to the next multiple is padding, marked -1 in `m_indices`. So every 128-row block
belongs to one group or to none, and a kernel can pick one weight matrix per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

M_ALIGNMENT = 128


def get_m_alignment_for_contiguous_layout() -> int:
  """Row alignment of each group in the contiguous layout (DeepGEMM's name): 128."""
  return M_ALIGNMENT


def contiguous_m_indices(group_sizes, m_sum: int) -> tuple[jax.Array, jax.Array]:
  """Builds `m_indices` for groups of the given sizes, each padded up to a multiple of 128.

  Jittable with traced `group_sizes`: the layout has a static `m_sum` rows and a row past the
  last group is padding too. Groups that do not fit are cut short; the returned offsets let a
  caller count what did not fit (`sum(group_sizes) - sum(rows kept)`).

  Args:
    group_sizes: `[num_groups]` int, rows per group (>= 0).
    m_sum: total rows of the layout, a multiple of 128.

  Returns:
    `(m_indices [m_sum] int32, group_starts [num_groups + 1] int32)`, where group g's rows are
    `group_starts[g] : group_starts[g] + group_sizes[g]` (clipped to `m_sum`) and
    `group_starts[-1]` is the total aligned size (which may exceed `m_sum`).
  """
  if m_sum < 0 or m_sum % M_ALIGNMENT:
    raise ValueError(f"m_sum must be a non-negative multiple of {M_ALIGNMENT}, got {m_sum}")
  if not isinstance(group_sizes, jax.core.Tracer):
    concrete = np.asarray(group_sizes)
    if concrete.dtype.kind not in "iu" or (concrete < 0).any():
      raise ValueError(f"group_sizes must be non-negative integers, got {concrete!r}")
  sizes = jnp.asarray(group_sizes, dtype=jnp.int32)
  if sizes.ndim != 1:
    raise ValueError(f"group_sizes must be 1-D [num_groups], got shape {sizes.shape}")
  return _contiguous_m_indices(sizes, int(m_sum))


@functools.partial(jax.jit, static_argnums=1)
def _contiguous_m_indices(sizes, m_sum):
  aligned = (sizes + M_ALIGNMENT - 1) // M_ALIGNMENT * M_ALIGNMENT
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(aligned, dtype=jnp.int32)])
  rows = jnp.arange(m_sum, dtype=jnp.int32)
  group = jnp.searchsorted(starts[1:], rows, side="right").astype(jnp.int32)
  in_range = group < sizes.shape[0]
  safe = jnp.where(in_range, group, 0)
  is_row = in_range & (rows < starts[safe] + sizes[safe])
  return jnp.where(is_row, group, -1).astype(jnp.int32), starts


def block_groups(m_indices: jax.Array) -> jax.Array:
  """The group of each 128-row block: its first row's index, as DeepGEMM reads it (-1: skip).

  Args:
    m_indices: `[m_sum]` int32 with `m_sum % 128 == 0`.

  Returns:
    `[m_sum // 128]` int32.
  """
  return m_indices.reshape(-1, M_ALIGNMENT)[:, 0]


def contiguous_row_status(m_indices: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Which rows of a contiguous layout compute, and which break the layout.

  A well-formed block is `[g] * r + [-1] * (128 - r)`: the group's rows first, padding after,
  and a block with padding is its group's last. Under jit `m_indices` cannot be checked up
  front, so the GEMM makes a broken layout loud: its rows come out NaN instead of silently
  using another group's weights (or none, as a kernel that reads only the first row would).

  Returns:
    `(is_padding [m_sum] bool, broken [m_sum] bool)`: rows marked -1, and rows that are
    neither padding nor a well-placed row of their block's group in [0, num_groups).
  """
  blocks = m_indices.reshape(-1, M_ALIGNMENT)
  first = blocks[:, 0]
  is_padding = blocks == -1
  after_padding = jax.lax.cummax(is_padding.astype(jnp.int32), axis=1).astype(bool)
  has_padding = is_padding.any(axis=1)
  # A block that continues the previous block's group although that block had padding: a gap.
  continues_after_gap = jnp.concatenate([jnp.zeros(1, bool), (first[1:] == first[:-1]) & has_padding[:-1]])
  good = ((blocks == first[:, None]) & ~after_padding & (blocks >= 0) & (blocks < num_groups)
          & ~continues_after_gap[:, None])
  return is_padding.reshape(-1), (~is_padding & ~good).reshape(-1)
