"""FlashMLA's split-KV combine as a Pallas Mosaic GPU kernel: merge each request's partials by log-sum-exp.

For the slots s of request r (`num_splits[r] : num_splits[r + 1]`), per query row:
  lse = log(sum_s exp(lse_s - max_s lse_s)) + max_s lse_s,   out = sum_s exp(lse_s - lse) * o_s
A row no slot saw a key of (every lse_s = -inf) gets out = 0 and lse = +inf. One CTA per
(request, KV head, 64-row tile): a first pass over the slots' lse rows finds the maximum and the
sum, then each 128-column chunk of the output is accumulated over the slots' partial tiles, all
staged through shared memory by TMA. Same math as `mla.combine.combine_splits` (the xla path's).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from backends import mosaic_interpret

ROWS = 64
CHUNK = 128  # output columns per accumulation pass
_LN2 = math.log(2.0)


def _swizzled(itemsize: int) -> tuple:
  """128-byte swizzle: register layouts load and store these tiles without bank conflicts."""
  swizzle = plgpu.find_swizzle(CHUNK * itemsize * 8)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


@functools.partial(jax.jit, static_argnames=("batch", "heads_k", "rows_pad", "out_dtype", "interpret", "detect_races"))
def combine(o_accum: jax.Array, lse_accum: jax.Array, num_splits: jax.Array, *, batch: int, heads_k: int,
            rows_pad: int, out_dtype, interpret: bool, detect_races: bool = False) -> tuple[jax.Array, jax.Array]:
  """Merges partials laid out by slot.

  Args:
    o_accum: `[slots * heads_k * rows_pad, dim_v]` float32, row `(slot * heads_k + h) * rows_pad + i`.
    lse_accum: `[slots * heads_k * rows_pad]` float32, natural log; -inf for a partial with no key.
    num_splits: `[batch + 1]` int32 slot prefix sums.
    batch, heads_k, rows_pad: the layout (rows_pad a multiple of 64).
    out_dtype: dtype of the merged output.
    interpret: run in Mosaic GPU interpret mode.
    detect_races: with interpret, look for races.

  Returns:
    `(out [batch * heads_k * rows_pad, dim_v] out_dtype, lse [batch * heads_k * rows_pad] float32)`.
  """
  dim_v = o_accum.shape[1]
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def kernel(o_ref, lse_ref, splits_ref, out_ref, lse_out_ref, lse_smem, o_smem, out_smem, lse_stage, barrier):
    request, head, tile = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("m")
    first, end = splits_ref[request], splits_ref[request + 1]

    def slot_rows(slot):
      return pl.ds((slot * heads_k + head) * rows_pad + tile * ROWS, ROWS)

    def slot_lse(slot):
      plgpu.copy_gmem_to_smem(lse_ref.at[slot_rows(slot)], lse_smem, barrier)
      plgpu.barrier_wait(barrier)
      value = plgpu.load(lse_smem, (), layout=row_layout)
      plgpu.commit_smem()  # every lane has read before the next copy lands
      return value

    minus_inf = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
    peak = lax.fori_loop(first, end, lambda s, m: jnp.maximum(m, slot_lse(s)), minus_inf)
    has_key = peak > -jnp.inf
    shift = jnp.where(has_key, peak, 0.0)
    zero = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
    total = lax.fori_loop(first, end, lambda s, t: t + jnp.exp(slot_lse(s) - shift), zero)
    safe = jnp.where(has_key, total, 1.0)
    lse = jnp.where(has_key, shift + jnp.log(safe), jnp.inf)
    out_rows = pl.ds((request * heads_k + head) * rows_pad + tile * ROWS, ROWS)

    for c in range(dim_v // CHUNK):
      cols = pl.ds(c * CHUNK, CHUNK)

      def add(slot, acc):
        weight = jnp.exp(slot_lse(slot) - jnp.where(has_key, lse, 0.0))
        plgpu.copy_gmem_to_smem(o_ref.at[slot_rows(slot), cols], o_smem, barrier)
        plgpu.barrier_wait(barrier)
        part = plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        return acc + lax.broadcast_in_dim(weight, part.shape, [0]) * part

      acc = lax.fori_loop(first, end, add, plgpu.layout_cast(jnp.zeros((ROWS, CHUNK), jnp.float32),
                                                                 plgpu.Layout.WGMMA))
      acc = jnp.where(lax.broadcast_in_dim(has_key, acc.shape, [0]), acc, 0.0)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      out_smem[...] = acc.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[out_rows, cols])
    lse_stage[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(lse_stage, lse_out_ref.at[out_rows])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  rows_total = batch * heads_k * rows_pad
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((rows_total, dim_v), out_dtype), jax.ShapeDtypeStruct((rows_total,), jnp.float32)),
      grid=(batch, heads_k, rows_pad // ROWS), grid_names=("b", "h", "m"),
      scratch_types=[plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS, CHUNK), jnp.float32, transforms=_swizzled(4)),
                     plgpu.SMEM((ROWS, CHUNK), out_dtype, transforms=_swizzled(jnp.dtype(out_dtype).itemsize)),
                     plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier()],
      interpret=mosaic_interpret.params(interpret, detect_races=detect_races),
  )
  return call(o_accum, lse_accum, num_splits)
