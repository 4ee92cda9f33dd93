"""The pytrees that dispatch returns: results, and the handles that combine (and the backward passes) reuse."""

from __future__ import annotations

from typing import NamedTuple

import jax


class DispatchHandle(NamedTuple):
  """How one normal-mode dispatch moved rows; combine sends them back the same way.

  R is the `ep` axis size, T the source tokens, C = min(T, capacity) the rows a source packs
  per destination, and `capacity` the rows a rank receives.
  """
  topk_rank: jax.Array  # [T, K] int32, the rank of each source token's k-th expert (-1 = none)
  send_src_idx: jax.Array  # [R, C] int32, source token of each packed row per destination, -1 unused
  send_counts: jax.Array  # [R] int32, rows sent to each destination (after its capacity)
  send_offsets: jax.Array  # [R] int32, where those rows start in each destination's result
  recv_counts: jax.Array  # [R] int32, rows received from each source
  recv_prefix: jax.Array  # [R] int32, first result row of each source's block
  recv_slot: jax.Array  # [capacity] int32, row s * C + p of the received blocks, -1 past num_valid
  is_token_in_rank: jax.Array  # [T, R] bool, DeepEP's layout (before any drop)


class DispatchResult(NamedTuple):
  """What a rank received, in DeepEP's order: by (source rank, source token); zeros past `num_valid`."""
  x: jax.Array  # [capacity, H], x's dtype (float8_e4m3fn for FP8 dispatch)
  x_scales: jax.Array | None  # [capacity, H / 128] float32 with FP8 input, else None
  topk_idx: jax.Array  # [capacity, K] int32 local expert ids in [0, E / R), -1 for other ranks' and padding
  topk_weights: jax.Array  # [capacity, K] float32 (or the input's dtype), 0 where topk_idx is -1
  src_rank: jax.Array  # [capacity] int32, -1 past num_valid
  src_token: jax.Array  # [capacity] int32, -1 past num_valid
  num_tokens_per_expert: jax.Array  # [E / R] int32 rows per local expert, rounded up to expert_alignment
  num_valid: jax.Array  # [] int32 rows received
  num_dropped: jax.Array  # [] int32 rows that did not fit in capacity


class LowLatencyHandle(NamedTuple):
  """Where each received row of a low-latency dispatch came from; M = num_max_dispatch_tokens_per_rank."""
  src_info: jax.Array  # [E_local, R * M] int32, source rank * M + source token; -1 past recv_count
  recv_count: jax.Array  # [E_local] int32
  layout_range: jax.Array  # [E_local, R, 2] int32, (first row, rows) of each source's block per expert
