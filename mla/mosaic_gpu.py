"""The `"mosaic_gpu"` implementation of `flash_mla_with_kvcache`: FlashMLA's decode kernel in Pallas Mosaic GPU.

Work split, as FlashMLA's: the query rows that share a KV head (MTP tokens x heads per KV head)
are folded into 64-row M tiles; the grid is (M tiles, h_kv, num_sm_parts), and each CTA walks
the pieces its partition of `tile_scheduler_metadata` names: a run of 64-token pages of one
request. Per page:
1. the producer warpgroup TMA-loads the page's 64 x 576 latent tile (looked up in the block
   table) into a shared-memory ring;
2. each of two consumer warpgroups computes QK^T with bf16 wgmma (Q stays in shared memory);
3. an online softmax in registers, in base 2, masks positions past the length (and, for causal
   MTP, past each token's own position);
4. P.V with V = the first 512 columns of the same tile (no second load): the two consumers
   split V's columns, 256 each (FlashMLA's two-warpgroup split of the output).
A page past the length is never read; the part of the last page past it is zeroed in shared
memory before P.V (a cache may hold anything there, NaN included).

The FP8 cache (`mla.fp8_cache`, 656 bytes per token) is read through three views of the same
bytes, so each page arrives as four TMA copies: two 64 x 256 halves of the e4m3 values, the
64 x 4 float32 scales and the 64 x 64 bf16 RoPE part (untiled: a token's pieces do not start on
tile boundaries). Consumer w dequantizes half w (value times its tile's scale, zero past the
length), consumer 0 also the RoPE part, into one bf16 64 x 576 tile in shared memory that both
then read as the bf16 path reads its ring slot. Two barriers per page order the halves' writes
against the other consumer's reads. That tile leaves room for only one ring stage.

Every piece writes an f32 partial output and log-sum-exp (`o_accum`, `lse_accum`) into its
slot; the Mosaic GPU combine kernel (`mla.mosaic_combine`) merges each request's slots with
FlashMLA's log-sum-exp math, so a request of length 0 gets out = 0 and lse = +inf.
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
from backends.sm90 import require_sm90
from mla import fp8_cache
from mla import metadata as meta
from mla import mosaic_combine

ROWS = 64  # query rows per M tile and per consumer warpgroup
V_PART = 128  # output columns per P.V wgmma: accumulator and partial stay within the register file
PAGE = meta.PAGE_SIZE
SMEM_BYTES = 232448
_LOG2E = math.log2(math.e)
_MEMORY_REGISTERS = 40


def _check_device(interpret: bool) -> None:
  if not interpret:
    require_sm90("the mosaic_gpu MLA kernel")


def _stages_and_chunk(dim_qk: int, dim_v: int, fp8: bool) -> tuple[int, int]:
  """Ring depth and the column width of the f32 output staging, as shared memory allows."""
  q_tile = ROWS * dim_qk * 2
  if fp8:  # a page is four copies, dequantized into one bf16 tile
    page_bytes, fixed = PAGE * fp8_cache.BYTES_PER_TOKEN, q_tile + PAGE * dim_qk * 2
  else:
    page_bytes, fixed = PAGE * dim_qk * 2, q_tile
  half = dim_v // 2
  for stages in (2, 1):
    free = SMEM_BYTES - fixed - stages * page_bytes - 4096  # barriers, the lse row, alignment
    for chunk in (128, 64, 32, 16, 8):
      if half % chunk == 0 and 2 * ROWS * chunk * 4 <= free:
        return stages, chunk
  raise NotImplementedError(f"a {dim_qk}-wide page does not fit shared memory")


def flash_mla_mosaic_gpu(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, *,
                         head_dim_v: int, softmax_scale: float, causal: bool, is_fp8_kvcache: bool,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Split-KV decode on sm90; arguments as `mla.flash_mla_with_kvcache` (checked there)."""
  batch, seq_q, heads_q, dim_qk = q.shape
  num_pages, page_size, heads_k, _ = k_cache.shape
  if page_size != PAGE or head_dim_v % (2 * V_PART) or dim_qk % 64 or q.dtype != jnp.bfloat16:
    raise NotImplementedError("the mosaic_gpu MLA kernel takes bf16, 64-token pages, dim_qk a multiple of 64 "
                              f"and head_dim_v a multiple of 256; got {q.dtype}, {page_size}, {dim_qk}, {head_dim_v}")
  _check_device(interpret)
  if is_fp8_kvcache and k_cache.dtype != jnp.uint8:
    k_cache = lax.bitcast_convert_type(k_cache, jnp.uint8)  # FlashMLA's float8 view of the same bytes
  return _decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, head_dim_v=head_dim_v,
                 softmax_scale=float(softmax_scale), causal=bool(causal), fp8=bool(is_fp8_kvcache),
                 interpret=bool(interpret), detect_races=mosaic_interpret.DETECT_RACES)


def _fp8_views(k_cache):
  """`[pages, 64, h_kv, 656]` uint8 -> row views (one row per token) of its values, scales and RoPE part.

  Returns `(values [pages*64, h_kv*656] float8_e4m3fn, scales [pages*64, h_kv*164] float32,
  rope [pages*64, h_kv*328] bfloat16)`: bitcasts of the same bytes, so TMA copies a token's
  pieces by element offsets (head h's scales start at h*164 + 128, its RoPE at h*328 + 264).
  """
  num_pages, _, heads_k, width = k_cache.shape
  rows = k_cache.reshape(num_pages * PAGE, heads_k * width)
  values = lax.bitcast_convert_type(rows, jnp.float8_e4m3fn)
  scales = lax.bitcast_convert_type(rows.reshape(num_pages * PAGE, heads_k * width // 4, 4), jnp.float32)
  rope = lax.bitcast_convert_type(rows.reshape(num_pages * PAGE, heads_k * width // 2, 2), jnp.bfloat16)
  return values, scales, rope


@functools.partial(jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal", "fp8", "interpret",
                                             "detect_races"))
def _decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, *, head_dim_v: int,
            softmax_scale: float, causal: bool, fp8: bool, interpret: bool, detect_races: bool):
  batch, seq_q, heads_q, dim_qk = q.shape
  num_pages, _, heads_k, width = k_cache.shape
  group = heads_q // heads_k
  rows = seq_q * group
  rows_pad = -(-rows // ROWS) * ROWS
  m_tiles = rows_pad // ROWS
  max_blocks = block_table.shape[1]
  num_blocks = (cache_seqlens + PAGE - 1) // PAGE
  valid, req, start, stop, slot = meta.expand_pieces(tile_scheduler_metadata, num_splits, num_blocks, max_blocks)
  num_pieces = valid.shape[0]
  num_parts = tile_scheduler_metadata.shape[0]
  rows_meta = tile_scheduler_metadata
  per_part = jnp.maximum(rows_meta[:, meta.END_REQ] - rows_meta[:, meta.BEGIN_REQ] + 1, 0)
  part_first = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_part, dtype=jnp.int32)])
  part_first = jnp.minimum(part_first, num_pieces)
  # Stale metadata never makes the producer follow a table entry past a request's length (the
  # api turns such requests into NaN; the kernel must not read out of bounds on the way).
  stop = jnp.minimum(stop, num_blocks[req])
  start = jnp.minimum(start, stop)
  pieces = jnp.stack([req, jnp.where(valid, start, 0), jnp.where(valid, stop, 0), slot], axis=1).astype(jnp.int32)

  # Rows of a KV head: token-major, then the heads that share it (as the xla path folds them).
  q_rows = q.reshape(batch, seq_q, heads_k, group, dim_qk).transpose(0, 2, 1, 3, 4).reshape(batch, heads_k, rows, dim_qk)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0))).reshape(batch * heads_k * rows_pad, dim_qk)
  stages, chunk = _stages_and_chunk(dim_qk, head_dim_v, fp8)
  half = head_dim_v // 2
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # bf16: 128-byte rows
  scale_log2 = softmax_scale * _LOG2E
  if fp8:
    values, scales, rope = _fp8_views(k_cache)
    cache_rows = (values, values, scales, rope)  # the values go in as two halves
    half_nope = fp8_cache.D_NOPE // 2  # a TMA box is at most 256 elements wide
    scale_col, rope_col = fp8_cache.D_NOPE // 4, (fp8_cache.D_NOPE + 4 * fp8_cache.NUM_TILES) // 2

    def page_specs(page_of, head):  # element offsets into a token's uint8 / f32 / bf16 views
      return [plgpu.BlockSpec((PAGE, pl.Element(half_nope)), lambda j: (page_of(j), head * width)),
              plgpu.BlockSpec((PAGE, pl.Element(half_nope)), lambda j: (page_of(j), head * width + half_nope)),
              plgpu.BlockSpec((PAGE, pl.Element(fp8_cache.NUM_TILES)),
                              lambda j: (page_of(j), head * (width // 4) + scale_col)),
              plgpu.BlockSpec((PAGE, pl.Element(fp8_cache.D_ROPE)),
                              lambda j: (page_of(j), head * (width // 2) + rope_col))]
    dequantized = [plgpu.SMEM((PAGE, dim_qk), jnp.bfloat16, transforms=tiled)]
  else:
    cache_rows = (k_cache.reshape(num_pages * PAGE, heads_k * dim_qk),)  # page of KV head h: 64 rows, cols h*576...

    def page_specs(page_of, head):
      return [plgpu.BlockSpec((PAGE, dim_qk), lambda j: (page_of(j), head), transforms=tiled)]
    dequantized = []

  def kernel(q_ref, *refs):
    cache_refs, refs = refs[:len(cache_rows)], refs[len(cache_rows):]
    (table_ref, seqlens_ref, pieces_ref, part_first_ref, o_ref, lse_ref,
     q_smem, o_stage, lse_stage, q_barrier, sync, *kv_smem) = refs
    m_tile, head, part = lax.axis_index("m"), lax.axis_index("h"), lax.axis_index("p")
    wg = lax.axis_index("wg")

    def pipeline(body, consumer, steps, first_block, request, head):
      # The producer follows the block table: step j loads page table[request, first_block + j].
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(steps,), memory_registers=_MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=2,
          max_concurrent_steps=stages, compute_context=consumer,
          in_specs=page_specs(lambda j: table_ref[request, first_block + j], head))

    ignore = lambda *_, **__: None
    ring = pipeline(ignore, ignore, stages, 0, 0, 0).get_allocations(*cache_refs)

    def with_ring(ring):
      @pl.loop(part_first_ref[part], part_first_ref[part + 1])
      def _piece(piece):
        request, first_block, end_block, out_slot = (pieces_ref[piece, i] for i in range(4))
        length = seqlens_ref[request]
        q_row0 = (request * heads_k + head) * rows_pad + m_tile * ROWS
        out_row0 = (out_slot * heads_k + head) * rows_pad + m_tile * ROWS

        def sync_consumers():
          plgpu.barrier_arrive(sync)
          plgpu.barrier_wait(sync)

        def consumer(run):
          @pl.when(wg == 0)
          def _():
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row0, ROWS)], q_smem, q_barrier)
          plgpu.barrier_wait(q_barrier)
          row_layout = plgpu.Layout.WGMMA.reduce(1)
          row = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
          zero_row = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
          accs = tuple(plgpu.layout_cast(jnp.zeros((ROWS, V_PART), jnp.float32), plgpu.Layout.WGMMA)
                       for _ in range(half // V_PART))
          accs, row_max, denom = run((accs, row, zero_row))
          seen = row_max > -jnp.inf
          safe = jnp.where(seen, denom, 1.0)
          lse = jnp.where(seen, (row_max + jnp.log2(safe)) / _LOG2E, -jnp.inf)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last piece's stores have left smem
          for c in range(half // chunk):
            part_acc = accs[c * chunk // V_PART]
            within = c * chunk % V_PART
            piece_out = part_acc[:, within:within + chunk] / lax.broadcast_in_dim(safe, (ROWS, chunk), [0])
            o_stage.at[wg][...] = piece_out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_stage.at[wg], o_ref.at[pl.ds(out_row0, ROWS), pl.ds(wg * half + c * chunk, chunk)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

          @pl.when(wg == 0)
          def _():
            lse_stage[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(lse_stage, lse_ref.at[pl.ds(out_row0, ROWS)])
          sync_consumers()  # both are done with Q before the next piece overwrites it

        def dequantize(halves, scales, rope_smem, tail):
          """Consumer w writes NoPE half w (and consumer 0 the RoPE part) of the page into the bf16 tile."""
          sync_consumers()  # the other consumer has finished reading the last page's tile
          token = lambda: plgpu.broadcasted_iota(jnp.int32, (PAGE, 64), 0, layout=plgpu.Layout.WGMMA)
          # Untiled shared memory: these register loads may conflict on banks (optimized=False).
          load = lambda ref, layout: plgpu.load(ref, (), layout=layout, optimized=False)
          for w, values in enumerate(halves):
            @pl.when(wg == w)
            def _(w=w, values=values):
              for c in range(values.shape[1] // 64):  # 64 columns at a time, to keep few registers live
                col = w * values.shape[1] + c * 64
                scale = plgpu.load(scales.at[:, col // fp8_cache.TILE], (), layout=plgpu.Layout.WGMMA.reduce(1))
                value = load(values.at[:, pl.ds(c * 64, 64)], plgpu.Layout.WGMMA).astype(jnp.float32)
                scaled = value * lax.broadcast_in_dim(scale, value.shape, [0])
                kv_smem[0].at[:, pl.ds(col, 64)][...] = jnp.where(token() < tail, scaled, 0.0).astype(jnp.bfloat16)

          @pl.when(wg == 0)
          def _():
            rope = load(rope_smem, plgpu.Layout.WGMMA)
            kv_smem[0].at[:, pl.ds(fp8_cache.D_NOPE, fp8_cache.D_ROPE)][...] = jnp.where(
                token() < tail, rope, jnp.zeros_like(rope))
          plgpu.commit_smem()
          sync_consumers()  # the whole tile is written

        def page(step, *tiles_and_carry):
          *tiles, (accs, row_max, denom) = tiles_and_carry
          block = first_block + step[0]
          tail = length - block * PAGE  # valid rows of this page; past them the cache may hold NaN
          if fp8:
            *halves, scales, rope_smem = tiles
            dequantize(halves, scales, rope_smem, tail)
            k_smem = kv_smem[0]
          else:
            (k_smem,) = tiles
          v = k_smem.at[:, pl.ds(wg * half, half)]

          def qk(s_ref):
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            return s_ref[...]
          scores = pl.run_scoped(qk, plgpu.ACC((ROWS, PAGE), jnp.float32)) * scale_log2
          # Index vectors are made here, per page, not held across the loop: registers are scarce.
          position = block * PAGE + plgpu.broadcasted_iota(jnp.int32, (ROWS, PAGE), 1, layout=plgpu.Layout.WGMMA)
          if causal:  # a row vector: token t of the MTP window sees keys < L - s_q + 1 + t
            rows_here = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
            limit = lax.broadcast_in_dim(length - seq_q + 1 + (m_tile * ROWS + rows_here) // group, (ROWS, PAGE), [0])
            visible = (position < length) & (position < limit)
          else:
            visible = position < length
          scores = jnp.where(visible, scores, -jnp.inf)
          new_max = jnp.maximum(row_max, scores.max(axis=1))
          shift = jnp.where(new_max > -jnp.inf, new_max, 0.0)
          alpha = jnp.exp2(row_max - shift)
          probs = jnp.exp2(scores - lax.broadcast_in_dim(shift, scores.shape, [0]))
          denom = denom * alpha + probs.sum(axis=1)

          if not fp8:  # (the FP8 path zeroed the tail while dequantizing)
            @pl.when(tail < PAGE)
            def _():
              sync_consumers()  # the other consumer has finished reading K for its QK^T
              for c in range(half // 64):  # 64 columns at a time, to keep few registers live
                columns = v.at[:, pl.ds(c * 64, 64)]
                token = plgpu.broadcasted_iota(jnp.int32, (PAGE, 64), 0, layout=plgpu.Layout.WGMMA)
                columns[...] = jnp.where(token < tail, columns[...], jnp.zeros((PAGE, 64), v.dtype))
              plgpu.commit_smem()

          probs16 = probs.astype(q.dtype)
          new_accs = []
          for i, acc in enumerate(accs):  # V_PART columns at a time: a partial of 64 registers per thread
            def pv(part_ref, i=i):
              plgpu.wgmma(part_ref, probs16, v.at[:, pl.ds(i * V_PART, V_PART)])
              return part_ref[...]
            partial = pl.run_scoped(pv, plgpu.ACC((ROWS, V_PART), jnp.float32))
            new_accs.append(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + partial)
          return tuple(new_accs), new_max, denom

        pipeline(page, consumer, end_block - first_block, first_block, request, head)(*cache_refs, allocations=ring)

    pl.run_scoped(with_ring, ring, collective_axes="wg")
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_rows = (num_pieces + 1) * heads_k * rows_pad
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((out_rows, head_dim_v), jnp.float32), jax.ShapeDtypeStruct((out_rows,), jnp.float32)),
      grid=(m_tiles, heads_k, num_parts), grid_names=("m", "h", "p"),
      num_threads=3, thread_name="wg",
      scratch_types=[plgpu.SMEM((ROWS, dim_qk), q.dtype, transforms=tiled),
                     plgpu.SMEM((2, ROWS, chunk), jnp.float32),
                     plgpu.SMEM((ROWS,), jnp.float32),
                     plgpu.Barrier(num_barriers=1),
                     plgpu.Barrier(num_arrivals=2), *dequantized],
      interpret=mosaic_interpret.params(interpret, detect_races=detect_races),
  )
  o_accum, lse_accum = call(q_rows, *cache_rows, block_table, cache_seqlens, pieces, part_first)
  out, lse = mosaic_combine.combine(o_accum, lse_accum, num_splits, batch=batch, heads_k=heads_k, rows_pad=rows_pad,
                                    out_dtype=q.dtype, interpret=interpret, detect_races=detect_races)
  out = out.reshape(batch, heads_k, rows_pad, head_dim_v)[:, :, :rows]
  lse = lse.reshape(batch, heads_k, rows_pad)[:, :, :rows]
  out = out.reshape(batch, heads_k, seq_q, group, head_dim_v).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(batch, heads_k, seq_q, group).transpose(0, 1, 3, 2)
  return out.reshape(batch, seq_q, heads_q, head_dim_v).astype(q.dtype), lse.reshape(batch, heads_q, seq_q)
