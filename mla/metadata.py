"""FlashMLA's tile scheduler: which SM partition decodes which (request, KV block) ranges.

Decode work is split over `num_sm_parts` partitions (one CTA each per M tile and KV head).
A request of `L` cached tokens has `ceil(L / 64)` blocks and costs that plus a fixed overhead
of 5 units. Every partition gets a payload of `ceil(total / num_sm_parts) + 5` units and is
filled greedily, in request order, with contiguous (request, block) ranges; a request that
does not fit is split, and its rest continues in the next partition. Each piece of a request
is one "split": it produces a partial output and log-sum-exp that the combine step merges.

One metadata row per partition (int32), the layout of FlashMLA's current `DecodingSchedMeta`:

  0 begin_req               first request touched (inclusive)
  1 end_req                 last request touched (inclusive); < begin_req when the partition is empty
  2 begin_block             first block of begin_req
  3 end_block               one past the last block of end_req
  4 begin_split             split index of begin_req's piece here (how many pieces came before)
  5 is_first_req_splitted   begin_req also has blocks in another partition
  6 is_last_req_splitted    end_req also has blocks in another partition
  7 (padding)

`num_splits [b + 1]` is the prefix sum of pieces per request: request r's partials live in
slots `num_splits[r] : num_splits[r + 1]`, in block order.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

PAGE_SIZE = 64  # tokens per KV block, and the scheduler's unit
FIXED_OVERHEAD_BLOCKS = 5  # FlashMLA's per-request cost on top of its blocks
M_TILE = 64  # query rows per CTA: MTP tokens x heads per KV head are folded into M
METADATA_SIZE = 8

BEGIN_REQ, END_REQ, BEGIN_BLOCK, END_BLOCK, BEGIN_SPLIT, FIRST_SPLITTED, LAST_SPLITTED = range(7)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def get_num_sm_parts(num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int = 132) -> int:
  """`max(num_sms // num_heads_k // ceil(num_q_tokens_per_head_k / 64), 1)`, as FlashMLA sizes its grid."""
  num_q_tokens_per_head_k = _positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
  num_heads_k = _positive_int("num_heads_k", num_heads_k)
  num_sms = _positive_int("num_sms", num_sms)
  return max(num_sms // num_heads_k // -(-num_q_tokens_per_head_k // M_TILE), 1)


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     num_sms: int = 132) -> tuple[jax.Array, jax.Array]:
  """Partitions a decode step's KV blocks over the SM partitions, as FlashMLA's scheduler does.

  Jittable: `cache_seqlens` may be traced, so a whole decode step stays in one jit. Compute it
  once per step and share it across layers.

  Args:
    cache_seqlens: `[b]` int32, cached tokens per request (>= 0).
    num_q_tokens_per_head_k: query rows per KV head, `s_q * h_q // h_kv`.
    num_heads_k: KV heads, h_kv.
    num_sms: streaming multiprocessors to plan for (132 on H100, H200 and H800).

  Returns:
    `(tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32)`; the row
    layout is in this module's docstring.
  """
  num_sm_parts = get_num_sm_parts(num_q_tokens_per_head_k, num_heads_k, num_sms)
  seqlens = cache_seqlens if isinstance(cache_seqlens, jax.Array) else jnp.asarray(cache_seqlens)
  if seqlens.ndim != 1 or not jnp.issubdtype(seqlens.dtype, jnp.integer):
    raise ValueError(f"cache_seqlens must be a 1-D int32 array [b], got {seqlens.dtype} {seqlens.shape}")
  if seqlens.shape[0] == 0:
    raise ValueError("cache_seqlens must hold at least one request")
  return _schedule(seqlens.astype(jnp.int32), num_sm_parts)


@functools.partial(jax.jit, static_argnums=1)
def _schedule(seqlens: jax.Array, num_sm_parts: int) -> tuple[jax.Array, jax.Array]:
  batch = seqlens.shape[0]
  num_blocks = (jnp.maximum(seqlens, 0) + PAGE_SIZE - 1) // PAGE_SIZE
  cost = num_blocks + FIXED_OVERHEAD_BLOCKS
  cum_cost = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(cost, dtype=jnp.int32)])  # [b + 1]
  payload = (cum_cost[-1] + num_sm_parts - 1) // num_sm_parts + FIXED_OVERHEAD_BLOCKS
  requests = jnp.arange(batch, dtype=jnp.int32)

  def one_partition(part, state):
    req, block, split, splits, metadata = state
    # Requests req..last-1 fit whole: consuming them costs cum_cost[last] - cum_cost[req] - block.
    target = payload + cum_cost[req] + block
    last = jnp.clip(jnp.searchsorted(cum_cost, target, side="right").astype(jnp.int32) - 1, req, batch)
    whole = (requests >= req) & (requests < last)
    splits = jnp.where(whole, jnp.where(requests == req, split + 1, 1), splits)
    spent = jnp.where(last > req, cum_cost[last] - cum_cost[req] - block, 0)
    remain = payload - spent
    carried_block = jnp.where(last == req, block, 0)  # the request `last` starts where it stood
    carried_split = jnp.where(last == req, split, 0)
    partial = (last < batch) & (remain - FIXED_OVERHEAD_BLOCKS > 0)
    next_block = jnp.where(partial, carried_block + remain - FIXED_OVERHEAD_BLOCKS, carried_block)
    next_split = jnp.where(partial, carried_split + 1, carried_split)
    next_block = jnp.where(last < batch, next_block, 0)
    next_split = jnp.where(last < batch, next_split, 0)

    end_req = jnp.where(next_block > 0, last, last - 1)
    safe_end = jnp.clip(end_req, 0, batch - 1)
    end_block = jnp.where(next_block > 0, next_block, num_blocks[jnp.clip(last - 1, 0, batch - 1)])
    first_splitted = block != 0
    last_splitted = end_block != num_blocks[safe_end]
    same = req == end_req
    first_splitted, last_splitted = (jnp.where(same, first_splitted | last_splitted, first_splitted),
                                     jnp.where(same, first_splitted | last_splitted, last_splitted))
    row = jnp.stack([req, end_req, block, end_block, split, first_splitted.astype(jnp.int32),
                     last_splitted.astype(jnp.int32), jnp.int32(0)]).astype(jnp.int32)
    metadata = metadata.at[part].set(row)
    return last, next_block, next_split, splits, metadata

  # Zeros typed like seqlens: under shard_map (data-parallel decode) the loop carry varies over
  # the same mesh axes as the lengths, so the loop's input and output types agree.
  zero = jnp.zeros_like(seqlens[0])
  init = (zero, zero, zero, jnp.zeros(batch, jnp.int32) + zero, jnp.zeros((num_sm_parts, METADATA_SIZE), jnp.int32) + zero)
  _, _, _, splits, metadata = jax.lax.fori_loop(0, num_sm_parts, one_partition, init)
  num_splits = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(splits, dtype=jnp.int32)])
  return metadata, num_splits


def expand_pieces(tile_scheduler_metadata: jax.Array, num_splits: jax.Array, num_blocks: jax.Array,
                  max_blocks: int):
  """Expands partition rows into pieces, one per (partition, request) pair, in slot order.

  Args:
    tile_scheduler_metadata: `[num_sm_parts, 8]` int32.
    num_splits: `[b + 1]` int32.
    num_blocks: `[b]` int32, `ceil(cache_seqlens / 64)`.
    max_blocks: block-table width; block ranges are clipped to it.

  Returns:
    `(valid, request, first_block, end_block, slot)`, each `[b + num_sm_parts]` int32 (valid:
    bool). A piece covers blocks `first_block : end_block` of `request` and writes its partial
    to `slot = num_splits[request] + its split index`; invalid pieces have slot `b + num_sm_parts`.
  """
  batch = num_blocks.shape[0]
  rows = tile_scheduler_metadata
  num_parts = rows.shape[0]
  num_pieces = batch + num_parts  # at most b + num_sm_parts - 1: each split boundary adds one
  begin_req, end_req = rows[:, BEGIN_REQ], rows[:, END_REQ]
  per_part = jnp.maximum(end_req - begin_req + 1, 0)
  first_piece = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_part, dtype=jnp.int32)])
  piece = jnp.arange(num_pieces, dtype=jnp.int32)
  part = jnp.clip(jnp.searchsorted(first_piece, piece, side="right").astype(jnp.int32) - 1, 0, num_parts - 1)
  req = begin_req[part] + piece - first_piece[part]
  valid = (piece < first_piece[-1]) & (req >= 0) & (req < batch)
  req = jnp.clip(req, 0, batch - 1)
  is_first, is_last = req == begin_req[part], req == end_req[part]
  start = jnp.where(is_first, rows[part, BEGIN_BLOCK], 0)
  stop = jnp.minimum(jnp.where(is_last, rows[part, END_BLOCK], num_blocks[req]), max_blocks)
  valid &= (start >= 0) & (start <= stop)
  slot = jnp.where(valid, num_splits[req] + jnp.where(is_first, rows[part, BEGIN_SPLIT], 0), num_pieces)
  return valid, req, start, stop, slot


def uncovered_requests(tile_scheduler_metadata: jax.Array, num_splits: jax.Array, cache_seqlens: jax.Array,
                       max_blocks: int) -> jax.Array:
  """`[b]` bool: requests whose blocks the metadata does not cover exactly once, slot by slot.

  Stale metadata (from other lengths) or metadata of another batch would silently give a wrong
  answer; `mla.api` turns these requests' outputs into NaN instead.
  """
  num_blocks = (jnp.maximum(cache_seqlens, 0) + PAGE_SIZE - 1) // PAGE_SIZE
  valid, req, start, stop, slot = expand_pieces(tile_scheduler_metadata, num_splits, num_blocks, max_blocks)
  num_pieces = valid.shape[0]
  covered = jax.ops.segment_sum(jnp.where(valid, stop - start, 0), req, num_segments=num_blocks.shape[0])
  fills = jnp.zeros(num_pieces + 1, jnp.int32).at[slot].add(1)[:num_pieces]
  used = jnp.arange(num_pieces) < num_splits[-1]
  consistent = (jnp.sum(valid) == num_splits[-1]) & jnp.all(jnp.where(used, fills == 1, fills == 0))
  return (covered != num_blocks) | ~consistent
