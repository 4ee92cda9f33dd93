"""The jnp references of the dispatch ops (`"xla"`): the oracle the FFI handlers are tested against.

Semantics are in `ffi/csrc/INTERFACE.md`. Experts are laid out contiguously by rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _token_in_rank(topk_idx: jax.Array, num_experts: int, num_ranks: int) -> jax.Array:
  ranks = jnp.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks), -1)  # [T, K]
  return (ranks[:, :, None] == jnp.arange(num_ranks)[None, None, :]).any(axis=1)  # [T, R]


@functools.partial(jax.jit, static_argnames=("num_experts", "num_ranks"))
def dispatch_layout(topk_idx, *, num_experts: int, num_ranks: int):
  """`(num_tokens_per_rank [R], num_tokens_per_expert [E], is_token_in_rank [T, R] bool)`."""
  in_rank = _token_in_rank(topk_idx, num_experts, num_ranks)
  experts = jnp.where(topk_idx >= 0, topk_idx, num_experts).reshape(-1)  # -1 -> a dropped bin
  per_expert = jnp.zeros(num_experts, jnp.int32).at[experts].add(1, mode="drop")
  return in_rank.sum(axis=0, dtype=jnp.int32), per_expert, in_rank


@functools.partial(jax.jit, static_argnames=("num_experts", "num_ranks", "capacity"))
def dispatch_pack(x, topk_idx, *, num_experts: int, num_ranks: int, capacity: int):
  """`(buffer [R, C, H], counts [R], offsets [R], src_idx [R, C], num_dropped [R])`."""
  tokens = x.shape[0]
  in_rank = _token_in_rank(topk_idx, num_experts, num_ranks)  # [T, R]
  position = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1  # row of token t within rank r
  rank = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32)[None, :], in_rank.shape)
  token = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], in_rank.shape)
  keep = in_rank & (position < capacity)
  src_idx = jnp.full((num_ranks, capacity), -1, jnp.int32).at[
      jnp.where(keep, rank, num_ranks), jnp.where(keep, position, 0)].set(token, mode="drop")
  filled = src_idx >= 0
  if tokens == 0:
    buffer = jnp.zeros((num_ranks, capacity, x.shape[1]), x.dtype)
  else:
    buffer = jnp.where(filled[..., None], x[jnp.maximum(src_idx, 0)], jnp.zeros((), x.dtype))
  wanted = in_rank.sum(axis=0, dtype=jnp.int32)
  counts = jnp.minimum(wanted, capacity)
  offsets = jnp.arange(num_ranks, dtype=jnp.int32) * capacity
  return buffer, counts, offsets, src_idx, wanted - counts


@functools.partial(jax.jit, static_argnames=("num_tokens",))
def combine_unpack(rows, src_idx, weights, *, num_tokens: int):
  """`out [T, H]`: each token's rows summed (times `weights`) in f32, in rows' dtype."""
  hidden = rows.shape[-1]
  if hidden == 0 or rows.size == 0:
    return jnp.zeros((num_tokens, hidden), rows.dtype)
  target = jnp.where(src_idx >= 0, src_idx, num_tokens).reshape(-1)
  contributions = (rows.astype(jnp.float32) * weights[..., None]).reshape(-1, hidden)
  out = jnp.zeros((num_tokens, hidden), jnp.float32).at[target].add(contributions, mode="drop")
  return out.astype(rows.dtype)
