"""FlashMLA's split-KV combine: merge each request's partial outputs by their log-sum-exp.

For the splits i of one request, with partial output o_i and natural-log lse_i:
  lse = log(sum_i exp(lse_i - max)) + max,    out = sum_i exp(lse_i - lse) * o_i
(FlashMLA does the same in base 2.) A query row no split saw any key of has every lse_i =
-inf; it gets out = 0 and lse = +inf, FlashMLA's convention for "no keys".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_splits(o_accum: jax.Array, lse_accum: jax.Array, num_splits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Merges partials stored by slot, request r owning slots `num_splits[r] : num_splits[r + 1]`.

  Args:
    o_accum: `[num_slots, ...rows, dim_v]` float32 partial outputs, each normalized by its own
      softmax denominator.
    lse_accum: `[num_slots, ...rows]` float32 natural-log sums; -inf for a split with no key.
    num_splits: `[batch + 1]` int32 prefix sums; slots past `num_splits[-1]` are ignored.

  Returns:
    `(out [batch, ...rows, dim_v] float32, lse [batch, ...rows] float32)`.
  """
  batch = num_splits.shape[0] - 1
  slots = jnp.arange(o_accum.shape[0], dtype=jnp.int32)
  owner = jnp.searchsorted(num_splits, slots, side="right").astype(jnp.int32) - 1
  owner = jnp.where(slots < num_splits[-1], owner, batch)  # unused slots go to a dropped segment
  peak = jax.ops.segment_max(lse_accum, owner, num_segments=batch + 1)[:batch]
  has_key = peak != -jnp.inf  # a NaN partial (a bad read) stays NaN rather than passing as "no keys"
  peak = jnp.where(has_key, peak, 0.0)
  peak_of_slot = jnp.concatenate([peak, jnp.zeros((1, *peak.shape[1:]), peak.dtype)])[owner]
  weight = jnp.exp(lse_accum - peak_of_slot)  # exp(-inf) = 0 for splits without keys
  total = jax.ops.segment_sum(weight, owner, num_segments=batch + 1)[:batch]
  lse = jnp.where(has_key, peak + jnp.log(jnp.where(has_key, total, 1.0)), jnp.inf)
  weighted = jnp.where(weight[..., None] > 0, weight[..., None] * o_accum, 0.0)
  out = jax.ops.segment_sum(weighted, owner, num_segments=batch + 1)[:batch]
  out = jnp.where(has_key[..., None], out / jnp.where(has_key, total, 1.0)[..., None], 0.0)
  return out, lse
