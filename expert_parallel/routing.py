"""Who sends which rows where: the dispatch layout, and the plan every rank agrees on before moving data.

The plan is DeepEP's `rank_prefix_matrix` made static-shaped: every rank all-gathers the rows
each source wants to send each destination (`[R, R]` int32, small), so each destination keeps
its sources' blocks in (source rank, source token) order, the first `capacity` rows of them, and
every sender knows how many of its rows were kept and where they land.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import ffi
from expert_parallel.types import DispatchHandle


def get_dispatch_layout(topk_idx, *, num_experts: int, num_ranks: int, implementation: str | None = None):
  """DeepEP's `get_dispatch_layout`: where each token goes (runs anywhere, no communication).

  Args:
    topk_idx: `[T, K]` int32 global expert ids, -1 = none; expert e lives on rank
      `e // (num_experts // num_ranks)`.
    num_experts: E, a multiple of num_ranks.
    num_ranks: R.
    implementation: "xla", "ffi" or None (ffi's choice per platform).

  Returns:
    `ffi.DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
    is_token_in_rank [T, R] bool)`: a token counts once per rank however many of its experts
    live there, and once per (token, k) entry for the experts.
  """
  return ffi.dispatch_layout(topk_idx, num_experts=num_experts, num_ranks=num_ranks, implementation=implementation)


def per_rank(value: jax.Array, axis_name) -> jax.Array:
  """Marks a value as varying over `axis_name` (this rank's own) if its type says it is the same everywhere.

  FFI results and fresh constants come out typed alike on every rank inside `shard_map`; a
  custom VJP's gradient, an all_gather or an out_spec must see them as per-rank values.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  missing = tuple(n for n in names if n not in jax.typeof(value).manual_axis_type.varying)
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def local_expert_ids(global_ids: jax.Array, num_local: int, rank) -> jax.Array:
  """Global expert ids -> this rank's local ids in [0, num_local), -1 for other ranks' experts and for -1."""
  local = global_ids - rank * num_local
  return jnp.where((global_ids >= 0) & (local >= 0) & (local < num_local), local, -1).astype(jnp.int32)


def plan_dispatch(topk_idx: jax.Array, *, num_experts: int, num_ranks: int, capacity: int, axis_name,
                  layout_implementation: str | None) -> tuple[DispatchHandle, jax.Array]:
  """Builds the handle of a normal-mode dispatch (inside shard_map; one small all_gather).

  Returns:
    `(handle, wanted [R] int32)`: wanted[s] is how many rows source s wanted to send here.
  """
  tokens = topk_idx.shape[0]
  per_source = min(tokens, capacity)
  layout = get_dispatch_layout(topk_idx, num_experts=num_experts, num_ranks=num_ranks,
                               implementation=layout_implementation)
  layout = jax.tree.map(lambda a: per_rank(a, axis_name), layout)
  in_rank = layout.is_token_in_rank
  position = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1  # row of token t in destination r's block
  keep = in_rank & (position < per_source)
  rank = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32)[None, :], in_rank.shape)
  token = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], in_rank.shape)
  send_src_idx = jnp.full((num_ranks, per_source), -1, jnp.int32).at[
      jnp.where(keep, rank, num_ranks), jnp.where(keep, position, 0)].set(token, mode="drop")

  me = lax.axis_index(axis_name)
  wanted = lax.all_gather(layout.num_tokens_per_rank, axis_name)  # [source, destination]
  before = jnp.cumsum(wanted, axis=0, dtype=jnp.int32) - wanted  # rows of earlier sources, per destination
  start = jnp.minimum(before, capacity)
  kept = jnp.clip(capacity - before, 0, wanted)  # a destination keeps its first `capacity` rows
  recv_counts, recv_prefix = kept[:, me], start[:, me]
  num_valid = recv_counts.sum()
  row = jnp.arange(capacity, dtype=jnp.int32)
  source = jnp.clip(jnp.searchsorted(recv_prefix + recv_counts, row, side="right"), 0, num_ranks - 1)
  recv_slot = jnp.where(row < num_valid, source * per_source + row - recv_prefix[source], -1).astype(jnp.int32)
  send_counts = kept[me, :]
  # Rows a destination will not keep are not sent (and come back as nothing in combine).
  send_src_idx = jnp.where(jnp.arange(per_source)[None, :] < send_counts[:, None], send_src_idx, -1)
  topk_rank = jnp.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks), -1).astype(jnp.int32)
  handle = DispatchHandle(topk_rank=topk_rank, send_src_idx=send_src_idx, send_counts=send_counts,
                          send_offsets=start[me, :], recv_counts=recv_counts, recv_prefix=recv_prefix,
                          recv_slot=recv_slot, is_token_in_rank=in_rank)
  return handle, wanted[:, me]
