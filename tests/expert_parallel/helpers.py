"""8-rank problems whose values name their source, and a numpy oracle of DeepEP's routing.

Row values encode (source rank, source token) in the first two columns (DeepEP's tests put the
rank in x and the token index in the last columns), so every received row is checked exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

RANKS = 8


def mesh():
  return jax.make_mesh((RANKS,), ("ep",))


def run(fn, *arrays):
  """Runs `fn` on each rank's slice (leading axis = rank) under shard_map; outputs stacked by rank."""
  m = mesh()
  put = lambda a: jax.device_put(a, NamedSharding(m, P("ep")))

  def per_rank(*blocks):
    out = fn(*(b[0] for b in blocks))
    return jax.tree.map(lambda a: a[None], out)

  out = jax.jit(jax.shard_map(per_rank, mesh=m, in_specs=P("ep"), out_specs=P("ep")))(*map(put, arrays))
  return jax.tree.map(np.asarray, out)


def routing(seed: int, tokens: int, topk: int, num_experts: int, *, empty_slots: int = 0, skip_expert=None):
  """`[R, T, K]` int32 distinct experts per token (DeepEP: top-k of random scores), some slots -1."""
  rng = np.random.default_rng(seed)
  experts = [e for e in range(num_experts) if e != skip_expert]
  idx = np.stack([np.stack([rng.choice(experts, topk, replace=False) for _ in range(tokens)])
                  for _ in range(RANKS)]).astype(np.int32)
  flat = idx.reshape(-1)
  flat[rng.choice(flat.size, empty_slots, replace=False)] = -1
  return idx


def encoded_x(tokens: int, hidden: int, dtype=jnp.bfloat16, seed: int = 0):
  """`[R, T, H]`: column 0 = source rank, column 1 = source token, the rest random."""
  x = np.array(jax.random.normal(jax.random.key(seed), (RANKS, tokens, hidden)), np.float32)
  x[..., 0] = np.arange(RANKS)[:, None]
  x[..., 1] = np.arange(tokens)[None, :]
  return jnp.asarray(x, dtype)


def expected_rows(topk_idx: np.ndarray, num_experts: int, receiver: int) -> list[tuple[int, int]]:
  """DeepEP's receive order at `receiver`: (source rank, source token) of each token it holds an expert of."""
  per_rank = num_experts // RANKS
  return [(s, t) for s in range(RANKS) for t in range(topk_idx.shape[1])
          if any(e >= 0 and e // per_rank == receiver for e in topk_idx[s, t])]


def ranks_reached(topk_idx: np.ndarray, num_experts: int) -> np.ndarray:
  """`[R, T]` number of distinct ranks each token goes to."""
  per_rank = num_experts // RANKS
  reached = np.zeros(topk_idx.shape[:2] + (RANKS,), bool)
  for s, t, k in np.ndindex(*topk_idx.shape):
    if topk_idx[s, t, k] >= 0:
      reached[s, t, topk_idx[s, t, k] // per_rank] = True
  return reached.sum(-1)
