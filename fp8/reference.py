"""The `"xla"` implementation of the four GEMMs: pure jnp, runs everywhere.

It follows DeepGEMM's numerics: for each 128-wide k block, an fp8 x fp8 `dot_general` with an
f32 result gives a partial product, which is scaled by `sa[m] * sb[n_block, k_block]` and
added into an f32 accumulator ("promotion"). The loop over k blocks is a `fori_loop`, so the
only large buffers are the accumulator and one partial, both the size of the output.

`interpret` is accepted and ignored: this path is plain XLA everywhere.

Arguments arrive checked by `fp8.validation`, and `fp8.api` zeros padding and masked-out rows
and poisons broken layouts afterwards, the same for every backend; these functions only compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fp8.formats import BLOCK
from fp8.layout import M_ALIGNMENT, block_groups

# k blocks per loop iteration: lets XLA fuse neighbouring blocks at bounded compile time (docs/performance.md).
_UNROLL = 8


def _scales_per_row(scale_blocks: jax.Array, rows: int) -> jax.Array:
  """`[..., ceil(rows/128), kb]` block scales -> `[..., rows, kb]`, one row per output column."""
  return jnp.repeat(scale_blocks, BLOCK, axis=-2)[..., :rows, :]


def promoted_matmul(a_fp8, sa, b_fp8, sb_rows) -> jax.Array:
  """`sum_kb (a[..., kb] @ b[..., kb].T) * sa[..., :, kb, None] * sb_rows[..., None, :, kb]` in f32.

  Args:
    a_fp8: `[..., m, k]` float8_e4m3fn, k a multiple of 128.
    sa: `[..., m, k/128]` float32.
    b_fp8: `[..., n, k]` float8_e4m3fn, with the same leading (batch) dims as a.
    sb_rows: `[..., n, k/128]` float32, the scale of each row of b per k block.

  Returns:
    `[..., m, n]` float32.
  """
  batch = a_fp8.ndim - 2
  if a_fp8.shape[-1] == 0:
    return jnp.zeros((*a_fp8.shape[:-1], b_fp8.shape[-2]), jnp.float32)
  dims = (((batch + 1,), (batch + 1,)), (tuple(range(batch)), tuple(range(batch))))
  out_shape = (*a_fp8.shape[:-1], b_fp8.shape[-2])

  def block(kb):
    a_blk = jax.lax.dynamic_slice_in_dim(a_fp8, kb * BLOCK, BLOCK, axis=-1)
    b_blk = jax.lax.dynamic_slice_in_dim(b_fp8, kb * BLOCK, BLOCK, axis=-1)
    partial = jax.lax.dot_general(a_blk, b_blk, dims, preferred_element_type=jnp.float32)
    scale_a = jax.lax.dynamic_index_in_dim(sa, kb, axis=-1, keepdims=False)[..., :, None]
    scale_b = jax.lax.dynamic_index_in_dim(sb_rows, kb, axis=-1, keepdims=False)[..., None, :]
    return partial * (scale_a * scale_b)

  num_blocks = a_fp8.shape[-1] // BLOCK
  # The first block starts the sum (not zeros), so under shard_map the carry varies like the inputs.
  first = block(0)
  return jax.lax.fori_loop(1, num_blocks, lambda kb, acc: acc + block(kb), first,
                           unroll=max(1, min(_UNROLL, num_blocks - 1)))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def gemm_nt(a, b, *, c, out_dtype, interpret=False):
  """`d [m, n] = c + a @ b.T`; see `fp8.gemm_nt`."""
  (a_fp8, sa), (b_fp8, sb) = a, b
  d = promoted_matmul(a_fp8, sa, b_fp8, _scales_per_row(sb, b_fp8.shape[0]))
  if c is not None:
    d = d + c
  return d.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def m_grouped_gemm_nt_contiguous(a, b, m_indices, *, out_dtype, interpret=False):
  """Each 128-row block times its group's weights: `d[blk] = a[blk] @ b[m_indices[blk * 128]].T`.

  Walks the blocks with `lax.map`, indexing the group's weights in place (never a copy per
  block). Padding rows come out as whatever they compute; `fp8.api` zeros them.
  """
  (a_fp8, sa), (b_fp8, sb) = a, b
  m_sum, k = a_fp8.shape
  num_groups, n, _ = b_fp8.shape
  num_blocks = m_sum // M_ALIGNMENT
  if num_blocks == 0:
    return jnp.zeros((0, n), out_dtype)

  def one_block(args):
    a_blk, sa_blk, group = args
    g = jnp.clip(group, 0, num_groups - 1)
    b_g = jax.lax.dynamic_index_in_dim(b_fp8, g, keepdims=False)
    sb_g = _scales_per_row(jax.lax.dynamic_index_in_dim(sb, g, keepdims=False), n)
    return promoted_matmul(a_blk, sa_blk, b_g, sb_g).astype(out_dtype)

  blocks = (a_fp8.reshape(num_blocks, M_ALIGNMENT, k), sa.reshape(num_blocks, M_ALIGNMENT, -1),
            block_groups(m_indices))
  return jax.lax.map(one_block, blocks).reshape(m_sum, n)


def m_grouped_gemm_nt_masked(a, b, masked_m, expected_m, *, out_dtype, interpret=False):
  """`d[g] = a[g] @ b[g].T` for every row; `fp8.api` zeros the rows past `masked_m[g]`."""
  del masked_m, expected_m  # all rows are computed; the hint is for kernels (and not a jit key here)
  return _batched_gemm_nt(a, b, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _batched_gemm_nt(a, b, *, out_dtype):
  (a_fp8, sa), (b_fp8, sb) = a, b
  return promoted_matmul(a_fp8, sa, b_fp8, _scales_per_row(sb, b_fp8.shape[1])).astype(out_dtype)


@jax.jit
def k_grouped_gemm_tn_contiguous(a, b, ks, *, c, interpret=False):
  """`d[g] = c[g] + a[k_g].T @ b[k_g]` in f32 over each group's block of k rows; rows past sum(ks) are skipped."""
  (a_fp8, sa), (b_fp8, sb) = a, b
  sum_k, m = a_fp8.shape
  n = b_fp8.shape[1]
  num_groups = ks.shape[0]
  ends = jnp.cumsum(ks)
  contract_rows = (((0,), (0,)), ((), ()))

  def step(kb, acc):
    start = kb * BLOCK
    group = jnp.searchsorted(ends, start, side="right")  # == num_groups past sum(ks): dropped
    a_blk = jax.lax.dynamic_slice_in_dim(a_fp8, start, BLOCK, axis=0)
    b_blk = jax.lax.dynamic_slice_in_dim(b_fp8, start, BLOCK, axis=0)
    partial = jax.lax.dot_general(a_blk, b_blk, contract_rows, preferred_element_type=jnp.float32)
    scale = jax.lax.dynamic_index_in_dim(sa, kb, keepdims=False)[:, None] * \
        jax.lax.dynamic_index_in_dim(sb, kb, keepdims=False)[None, :]
    return acc.at[group].add(partial * scale, mode="drop")

  init = jnp.zeros((num_groups, m, n), jnp.float32) if c is None else c
  if sum_k == 0:
    return init
  # The first step runs outside the loop, so under shard_map the carry varies like the inputs.
  num_blocks = sum_k // BLOCK
  return jax.lax.fori_loop(1, num_blocks, step, step(0, init), unroll=max(1, min(_UNROLL, num_blocks - 1)))
