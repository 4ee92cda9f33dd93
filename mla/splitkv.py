"""The `"xla"` implementation of `flash_mla_with_kvcache`: FlashMLA's scheduled split-KV in jnp.

The scheduler metadata is followed, not recomputed: each partition row names a run of
(request, block) ranges, and each (partition, request) pair is one split ("piece") with its
own online softmax over its blocks. Pieces are numbered in partition order, which is request
order, so piece p lands in slot `num_splits[req] + split` and the combine step merges each
request's slots by log-sum-exp, exactly the data flow of FlashMLA's kernel and combine.

All pieces advance together, one KV page per step, for as many steps as the longest piece
(a traced bound: the scheduler balances pieces, so this is about total_blocks / num_sm_parts).
Metadata that does not cover every block of a request exactly once (stale metadata, or metadata
of another batch) turns that request's output into NaN instead of a silently wrong answer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mla import metadata as meta
from mla.combine import combine_splits
from mla.fp8_cache import unpack


def _pieces(tile_scheduler_metadata, num_splits, num_blocks, max_blocks: int):
  """Expands partition rows into pieces: (valid, request, first block, end block, slot), each `[num_pieces]`."""
  batch = num_blocks.shape[0]
  rows = tile_scheduler_metadata
  num_parts = rows.shape[0]
  num_pieces = batch + num_parts  # at most b + num_sm_parts - 1 (each split boundary adds one)
  begin_req, end_req = rows[:, meta.BEGIN_REQ], rows[:, meta.END_REQ]
  per_part = jnp.maximum(end_req - begin_req + 1, 0)
  first_piece = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_part, dtype=jnp.int32)])
  piece = jnp.arange(num_pieces, dtype=jnp.int32)
  part = jnp.clip(jnp.searchsorted(first_piece, piece, side="right").astype(jnp.int32) - 1, 0, num_parts - 1)
  req = begin_req[part] + piece - first_piece[part]
  valid = (piece < first_piece[-1]) & (req >= 0) & (req < batch)
  req = jnp.clip(req, 0, batch - 1)
  is_first, is_last = req == begin_req[part], req == end_req[part]
  start = jnp.where(is_first, rows[part, meta.BEGIN_BLOCK], 0)
  stop = jnp.minimum(jnp.where(is_last, rows[part, meta.END_BLOCK], num_blocks[req]), max_blocks)
  slot = num_splits[req] + jnp.where(is_first, rows[part, meta.BEGIN_SPLIT], 0)
  valid &= (start >= 0) & (start <= stop)
  # Loud on bad metadata: every request's blocks covered exactly once, every slot filled once.
  covered = jax.ops.segment_sum(jnp.where(valid, stop - start, 0), req, num_segments=batch)
  slot = jnp.where(valid, slot, num_pieces)
  fills = jnp.zeros(num_pieces + 1, jnp.int32).at[slot].add(1)[:num_pieces]
  used = piece < num_splits[-1]
  consistent = (first_piece[-1] == num_splits[-1]) & jnp.all(jnp.where(used, fills == 1, fills == 0))
  broken = (covered != num_blocks) | ~consistent
  return valid, req, start, stop, slot, broken


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal", "is_fp8_kvcache"))
def flash_mla_splitkv(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, *,
                      head_dim_v: int, softmax_scale: float, causal: bool,
                      is_fp8_kvcache: bool) -> tuple[jax.Array, jax.Array]:
  """Split-KV decode; arguments as `mla.flash_mla_with_kvcache` (checked there)."""
  batch, seq_q, heads_q, dim_qk = q.shape
  num_pages, page_size, heads_k, _ = k_cache.shape
  group = heads_q // heads_k
  num_rows = seq_q * group  # MTP tokens x heads per KV head, folded into M as FlashMLA does
  max_blocks = block_table.shape[1]
  num_blocks = (cache_seqlens + page_size - 1) // page_size
  valid, req, start, stop, slot, broken = _pieces(tile_scheduler_metadata, num_splits, num_blocks, max_blocks)
  num_pieces = valid.shape[0]

  q_rows = q.reshape(batch, seq_q, heads_k, group, dim_qk).transpose(0, 2, 1, 3, 4)
  q_rows = q_rows.reshape(batch, heads_k, num_rows, dim_qk).astype(jnp.float32)[req]  # [P, h_kv, rows, d]
  seqlen = cache_seqlens[req]  # [P]
  limit = jnp.broadcast_to(seqlen[:, None], (num_pieces, num_rows))
  if causal:
    limit = limit - seq_q + 1 + jnp.arange(num_rows)[None, :] // group

  def step(j, state):
    row_max, denom, acc = state
    block = start + j
    active = valid & (block < stop)
    page = block_table[req, jnp.clip(block, 0, max_blocks - 1)]
    page = jnp.clip(jnp.where(active, page, 0), 0, num_pages - 1)  # unused table entries are never followed
    kv = k_cache[page]  # [P, 64, h_kv, d]
    kv = (unpack(kv, q.dtype) if is_fp8_kvcache else kv).astype(jnp.float32)
    position = block[:, None] * page_size + jnp.arange(page_size)[None, :]  # [P, 64]
    in_length = active[:, None] & (position < seqlen[:, None])
    visible = in_length[:, None, :] & (position[:, None, :] < limit[:, :, None])  # [P, rows, 64]
    scores = jnp.einsum("pkrd,ptkd->pkrt", q_rows, kv) * softmax_scale
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    new_max = jnp.maximum(row_max, scores.max(axis=-1))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(scores - shift[..., None])
    rescale = jnp.exp(row_max - shift)
    v = jnp.where(in_length[:, :, None, None], kv[..., :head_dim_v], 0.0)  # pages past the length may be NaN
    acc = acc * rescale[..., None] + jnp.einsum("pkrt,ptkd->pkrd", probs, v)
    return new_max, denom * rescale + probs.sum(axis=-1), acc

  init = (jnp.full((num_pieces, heads_k, num_rows), -jnp.inf, jnp.float32),
          jnp.zeros((num_pieces, heads_k, num_rows), jnp.float32),
          jnp.zeros((num_pieces, heads_k, num_rows, head_dim_v), jnp.float32))
  steps = jnp.max(jnp.where(valid, stop - start, 0))
  row_max, denom, acc = jax.lax.fori_loop(0, steps, step, init)
  seen = denom > 0
  lse_piece = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  o_piece = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)

  o_accum = jnp.zeros_like(o_piece).at[slot].set(o_piece, mode="drop")
  lse_accum = jnp.full_like(lse_piece, -jnp.inf).at[slot].set(lse_piece, mode="drop")
  out, lse = combine_splits(o_accum, lse_accum, num_splits)  # [b, h_kv, rows, dv], [b, h_kv, rows]
  out = jnp.where(broken[:, None, None, None], jnp.nan, out)
  lse = jnp.where(broken[:, None, None], jnp.nan, lse)
  out = out.reshape(batch, heads_k, seq_q, group, head_dim_v).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(batch, heads_k, seq_q, group).transpose(0, 1, 3, 2)
  return out.reshape(batch, seq_q, heads_q, head_dim_v).astype(q.dtype), lse.reshape(batch, heads_q, seq_q)
