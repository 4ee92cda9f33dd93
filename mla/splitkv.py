"""The `"xla"` implementation of `flash_mla_with_kvcache`: FlashMLA's scheduled split-KV in jnp.

The scheduler metadata is followed, not recomputed: each partition row names a run of
(request, block) ranges, and each (partition, request) pair is one split ("piece") with its
own online softmax over its blocks. Pieces are numbered in partition order, which is request
order, so piece p lands in slot `num_splits[req] + split` and the combine step merges each
request's slots by log-sum-exp, exactly the data flow of FlashMLA's kernel and combine.

All pieces advance together, one KV page per step, for as many steps as the longest piece
(a traced bound: the scheduler balances pieces, so this is about total_blocks / num_sm_parts).
`mla.api` checks that the metadata covers every block exactly once, for every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mla import metadata as meta
from mla.combine import combine_splits
from mla.fp8_cache import unpack


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal", "is_fp8_kvcache", "interpret"))
def flash_mla_splitkv(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, *,
                      head_dim_v: int, softmax_scale: float, causal: bool,
                      is_fp8_kvcache: bool, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Split-KV decode; arguments as `mla.flash_mla_with_kvcache` (checked there); `interpret` is
  ignored (this path is plain XLA everywhere)."""
  del interpret
  batch, seq_q, heads_q, dim_qk = q.shape
  num_pages, page_size, heads_k, _ = k_cache.shape
  group = heads_q // heads_k
  num_rows = seq_q * group  # MTP tokens x heads per KV head, folded into M as FlashMLA does
  max_blocks = block_table.shape[1]
  num_blocks = (cache_seqlens + page_size - 1) // page_size
  valid, req, start, stop, slot = meta.expand_pieces(tile_scheduler_metadata, num_splits, num_blocks, max_blocks)
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

  # Typed like the queries: under shard_map the loop carry varies over the same mesh axes.
  zero = jnp.zeros_like(q.reshape(-1)[:1].astype(jnp.float32)[0])
  init = (jnp.full((num_pieces, heads_k, num_rows), -jnp.inf, jnp.float32) + zero,
          jnp.zeros((num_pieces, heads_k, num_rows), jnp.float32) + zero,
          jnp.zeros((num_pieces, heads_k, num_rows, head_dim_v), jnp.float32) + zero)
  steps = jnp.max(jnp.where(valid, stop - start, 0))
  row_max, denom, acc = jax.lax.fori_loop(0, steps, step, init)
  seen = row_max > -jnp.inf  # saw a visible key; NaN from a bad read stays NaN (NaN > x is False, so test ==)
  seen = seen | jnp.isnan(row_max)
  lse_piece = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  o_piece = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)

  o_accum = jnp.zeros_like(o_piece).at[slot].set(o_piece, mode="drop")
  lse_accum = jnp.full_like(lse_piece, -jnp.inf).at[slot].set(lse_piece, mode="drop")
  out, lse = combine_splits(o_accum, lse_accum, num_splits)  # [b, h_kv, rows, dv], [b, h_kv, rows]
  out = out.reshape(batch, heads_k, seq_q, group, head_dim_v).transpose(0, 2, 1, 3, 4)
  lse = lse.reshape(batch, heads_k, seq_q, group).transpose(0, 1, 3, 2)
  return out.reshape(batch, seq_q, heads_q, head_dim_v).astype(q.dtype), lse.reshape(batch, heads_q, seq_q)
