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
  """The group of each 128-row block: its largest index, so -1 only for an all-padding block.

  Args:
    m_indices: `[m_sum]` int32 with `m_sum % 128 == 0`.

  Returns:
    `[m_sum // 128]` int32.
  """
  return jnp.max(m_indices.reshape(-1, M_ALIGNMENT), axis=-1)


def contiguous_row_status(m_indices: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Which rows of a contiguous layout compute, and which break the layout.

  Under jit `m_indices` cannot be checked up front, so the implementations use this to make a
  broken layout loud: its rows come out NaN instead of silently using another group's weights.

  Returns:
    `(computes [m_sum] bool, broken [m_sum] bool)`. A row computes when its index is its
    block's group; it is broken when it is neither that nor -1, or is out of [-1, num_groups).
  """
  groups = jnp.repeat(block_groups(m_indices), M_ALIGNMENT)
  in_range = (m_indices >= -1) & (m_indices < num_groups)
  computes = in_range & (m_indices >= 0) & (m_indices == groups)
  broken = ~in_range | ((m_indices != -1) & (m_indices != groups))
  return computes, broken
