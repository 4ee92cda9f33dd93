"""The Hopper FP8 GEMM kernel (Pallas Mosaic GPU) behind all four of DeepGEMM's GEMMs.

One kernel computes a list of output tiles. Each tile names the rows of A it reads, the rows of
the output it writes, the group (which B), and the run of 128-wide k blocks it sums, so the
plain, m-grouped (contiguous and masked) and k-grouped GEMMs differ only in the tile list their
wrappers build (`fp8.mosaic_gpu.ops`):

  out[out_row0 + r, n] = sum over k blocks kb of
      (A[a_row0 + r, kb] . B[group, n, kb]) * sa[kb, a_row0 + r] * sb[group, kb, n]

Structure, as DeepGEMM's sm90 kernel:
- a persistent grid of `num_sms` CTAs walks the (tile, n block) pairs in an L2-friendly snake;
- per CTA, a producer warpgroup streams the A and B tiles (K-major, 128-byte swizzled) and
  their scale vectors by TMA through a `stages`-deep shared-memory ring, and 1 or 2 consumer
  warpgroups (64 rows each) issue fp8 wgmma (`emit_pipeline_warp_specialized`);
- promotion: each k block's wgmma accumulates into a fresh f32 partial, which is then scaled by
  the outer product of its row scales (A's per-token scales) and column scales (B's block scale,
  expanded per column so any `block_n` works) and added to the f32 accumulator held in
  registers, working around Hopper's limited-precision fp8 accumulation;
- the epilogue writes the tile through shared memory with a TMA store, adding C first if given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from backends import mosaic_interpret as interpret_mode
from fp8.mosaic_gpu.config import BLOCK_K, ROWS_PER_WARPGROUP, Config

TILE_FIELDS = 5  # a_row0, out_row0, group, first k block, number of k blocks
_MEMORY_REGISTERS = 40  # the producer warpgroup only issues TMA


def _swizzled(minor_bytes: int, itemsize: int) -> tuple:
  swizzle = plgpu.find_swizzle(minor_bytes * 8)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


# Jitted with everything that shapes the kernel static: an eager call traces it once per problem
# shape and config, and a config built for another device (`ops.compile_for`) is another entry.
@functools.partial(jax.jit, static_argnames=("out_rows", "out_dtype", "config", "k_blocks", "interpret",
                                             "detect_races"))
def promoted_gemm(a, sa, b, sb, tiles, num_tiles, c, *, out_rows: int, out_dtype, config: Config,
                  k_blocks: int | None, interpret: bool, detect_races: bool = False) -> jax.Array:
  """Runs the tile list.

  Args:
    a: `[a_rows, k]` float8_e4m3fn, K-major.
    sa: `[k/128, a_rows]` float32, A's scale per row and k block (MN-major, as DeepGEMM's TMA wants).
    b: `[groups, n, k]` float8_e4m3fn, K-major.
    sb: `[groups, k/128, n]` float32, B's scale per column and k block.
    tiles: `[max_tiles, 5]` int32 rows `(a_row0, out_row0, group, first_k_block, k_block_count)`;
      row starts are multiples of `config.block_m`, every count is at least 1.
    num_tiles: `[1]` int32, how many leading rows of `tiles` to run (may be traced).
    c: None, or `[out_rows, n]` float32 added to the product.
    out_rows: rows of the output; rows no tile writes are left unwritten.
    out_dtype: bfloat16 or float32 (float32 when c is given).
    config: tiling.
    k_blocks: the k block count when every tile sums all of k (a static pipeline), else None.
    interpret: run in Mosaic GPU interpret mode (any backend) instead of compiling for sm90.
    detect_races: with interpret, have the interpreter look for races.

  Returns:
    `[out_rows, n]` of out_dtype.
  """
  n = b.shape[1]
  block_m, block_n = config.block_m, config.block_n
  warpgroups = config.compute_warpgroups
  n_blocks = n // block_n
  max_tiles = tiles.shape[0]
  out_bytes = jnp.dtype(out_dtype).itemsize
  operand_transforms = _swizzled(BLOCK_K, 1)
  out_transforms = _swizzled(block_n * out_bytes, out_bytes)

  def pipeline(body, consumer, steps, first_kb):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=_MEMORY_REGISTERS,
        wg_axis="wg",
        num_compute_wgs=warpgroups,
        max_concurrent_steps=config.stages,
        compute_context=consumer,
        in_specs=[
            plgpu.BlockSpec((block_m, BLOCK_K), lambda kb: (0, first_kb + kb), transforms=operand_transforms),
            plgpu.BlockSpec((block_n, BLOCK_K), lambda kb: (0, first_kb + kb), transforms=operand_transforms),
            plgpu.BlockSpec((1, block_m), lambda kb: (first_kb + kb, 0)),
            plgpu.BlockSpec((1, block_n), lambda kb: (first_kb + kb, 0)),
        ],
    )

  def operand_tiles(a_ref, b_ref, sa_ref, sb_ref, rows, group, cols):
    return a_ref.at[rows], b_ref.at[group, cols], sa_ref.at[:, rows], sb_ref.at[group, :, cols]

  def kernel(a_ref, sa_ref, b_ref, sb_ref, tiles_ref, count_ref, *refs):
    # The ring is allocated once, outside the tile loop, so that moving to the next tile costs
    # no CTA-wide barrier for a fresh allocation (only the ring's own synchronisation).
    ignore = lambda *_, **__: None
    first = operand_tiles(a_ref, b_ref, sa_ref, sb_ref, pl.ds(0, block_m), 0, pl.ds(0, block_n))
    ring = pipeline(ignore, ignore, k_blocks or config.stages, 0).get_allocations(*first)
    pl.run_scoped(functools.partial(tile_loop, a_ref, sa_ref, b_ref, sb_ref, tiles_ref, count_ref, refs),
                  ring, collective_axes="wg")

  def tile_loop(a_ref, sa_ref, b_ref, sb_ref, tiles_ref, count_ref, refs, ring):
    if c is None:
      c_ref, (out_ref, out_smem), c_barrier = None, refs, None
    else:
      c_ref, out_ref, out_smem, c_barrier = refs
    wg = lax.axis_index("wg")
    my_rows = pl.ds(wg * ROWS_PER_WARPGROUP, ROWS_PER_WARPGROUP)
    count = count_ref[0]

    @plgpu.nd_loop((count * n_blocks,), collective_axes="sm")
    def _tile(info):
      tile, n_block = plgpu.planar_snake(info.index[0], (count, n_blocks), 1, config.grid_tile_width)
      a_row0, out_row0, group = tiles_ref[tile, 0], tiles_ref[tile, 1], tiles_ref[tile, 2]
      first_kb = tiles_ref[tile, 3]
      steps = k_blocks if k_blocks is not None else tiles_ref[tile, 4]
      rows = pl.ds(a_row0, block_m)
      cols = pl.ds(n_block * block_n, block_n)

      def consumer(pipeline):
        zero = plgpu.layout_cast(jnp.zeros((ROWS_PER_WARPGROUP, block_n), jnp.float32), plgpu.Layout.WGMMA)
        acc = pipeline(zero)
        out_tile = out_ref.at[pl.ds(out_row0 + wg * ROWS_PER_WARPGROUP, ROWS_PER_WARPGROUP), cols]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has left smem
        if c_ref is None:
          out_smem.at[wg][...] = acc.astype(out_dtype)
        else:
          c_tile = c_ref.at[pl.ds(out_row0 + wg * ROWS_PER_WARPGROUP, ROWS_PER_WARPGROUP), cols]
          plgpu.copy_gmem_to_smem(c_tile, out_smem.at[wg], c_barrier.at[wg])
          plgpu.barrier_wait(c_barrier.at[wg])
          out_smem.at[wg][...] = out_smem.at[wg][...] + acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg], out_tile)

      def k_block(_, a_smem, b_smem, sa_smem, sb_smem, acc):
        # The scales are read first: their shared-memory latency hides under the wgmma.
        row_scale = plgpu.load(sa_smem.at[0, my_rows], (), layout=plgpu.Layout.WGMMA.reduce(1))
        col_scale = plgpu.load(sb_smem.at[0], (), layout=plgpu.Layout.WGMMA.reduce(0))

        def mma(partial_ref):
          # fp8 wgmma wants both operands K-major: B is fed as the transpose of its (n, k) tile.
          plgpu.wgmma(partial_ref, a_smem.at[my_rows], plgpu.transpose_ref(b_smem, (1, 0)))
          return partial_ref[...]  # waits for the wgmma
        partial = pl.run_scoped(mma, plgpu.ACC((ROWS_PER_WARPGROUP, block_n), jnp.float32))
        scale = lax.broadcast_in_dim(row_scale, partial.shape, [0]) * lax.broadcast_in_dim(col_scale, partial.shape, [1])
        return acc + partial * scale

      pipeline(k_block, consumer, steps, first_kb)(
          *operand_tiles(a_ref, b_ref, sa_ref, sb_ref, rows, group, cols), allocations=ring)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  scratch = [plgpu.SMEM((warpgroups, ROWS_PER_WARPGROUP, block_n), out_dtype, transforms=out_transforms)]
  if c is not None:
    scratch.append(plgpu.Barrier(num_barriers=warpgroups))
  call = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
      grid=(max(1, min(config.num_sms, max_tiles * n_blocks)),),
      grid_names=("sm",),
      num_threads=warpgroups + 1,
      thread_name="wg",
      scratch_types=scratch,
      interpret=interpret_mode.params(interpret, detect_races=detect_races),
  )
  args = (a, sa, b, sb, tiles, num_tiles) + (() if c is None else (c,))
  return call(*args)


@functools.partial(jax.jit, static_argnames=("n",))
def expand_block_scales(sb: jax.Array, n: int) -> jax.Array:
  """`[..., ceil(n/128), k/128]` 128x128 block scales -> `[..., k/128, n]`, one per column."""
  return jnp.repeat(jnp.swapaxes(sb, -1, -2), BLOCK_K, axis=-1)[..., :n]
