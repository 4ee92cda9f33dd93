"""Per-expert load tracking that updates inside jit; the rebalance itself runs on the host."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from balancer.validation import checked_int_array, check_positive_int


def count_expert_tokens(topk_idx: jax.Array, num_experts: int) -> jax.Array:
  """Counts the tokens routed to each expert.

  Args:
    topk_idx: `[..., num_tokens, num_topk]` int, the logical expert of each routing slot;
      -1 means no expert. Concrete input with ids outside `[-1, num_experts)` raises; under jit
      such ids cannot be checked and are not counted.
    num_experts: E.

  Returns:
    `[..., num_experts]` int32 token counts (for `[L, T, K]` routing, the `[L, E]` counts that
    `ExpertLoad.update` takes).
  """
  num_experts = check_positive_int("num_experts", num_experts)
  topk_idx, _ = checked_int_array("topk_idx", topk_idx, min_value=-1, max_value=num_experts - 1)
  if topk_idx.ndim < 2:
    raise ValueError(f"topk_idx must be [..., num_tokens, num_topk], got shape {topk_idx.shape}")
  batch_shape = topk_idx.shape[:-2]
  flat = topk_idx.reshape((math.prod(batch_shape), topk_idx.shape[-2] * topk_idx.shape[-1]))
  # Every invalid id (including -1) lands in an extra bucket that is cut off.
  bucket = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  counts = jax.vmap(lambda ids: jnp.zeros(num_experts + 1, jnp.int32).at[ids].add(1))(bucket)
  return counts[:, :num_experts].reshape(batch_shape + (num_experts,))


@struct.dataclass
class ExpertLoad:
  """Running per-expert token counts for every MoE layer, as a pytree.

  Two estimators, chosen at creation:
    - EMA (`decay`): `ema <- decay * ema + (1 - decay) * counts`, read with bias correction,
      so early reads are not pulled towards zero.
    - sliding window (`window`): the mean of the last `window` steps' counts, kept exactly in
      an int32 ring buffer.

  `update` is pure and jittable; read `loads()` and hand it to `rebalance_experts` on the host:

    >>> tracker = ExpertLoad.create(num_layers=2, num_experts=4, window=8)
    >>> tracker = jax.jit(ExpertLoad.update)(tracker, jnp.array([[3, 0, 1, 0], [0, 2, 2, 0]]))
    >>> np.asarray(tracker.loads()).tolist()
    [[3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.0]]

  Attributes:
    ema: `[L, E]` float32, the uncorrected EMA (zeros in window mode).
    history: `[window, L, E]` int32 ring buffer of counts (`[0, L, E]` in EMA mode).
    num_updates: `[]` int32, steps seen so far.
    decay: EMA decay in (0, 1), or None in window mode. Static.
  """

  ema: jax.Array
  history: jax.Array
  num_updates: jax.Array
  decay: float | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, num_layers: int, num_experts: int, *, decay: float | None = None,
             window: int | None = None) -> "ExpertLoad":
    """An empty tracker for `[num_layers, num_experts]` counts; give exactly one of decay, window."""
    num_layers = check_positive_int("num_layers", num_layers)
    num_experts = check_positive_int("num_experts", num_experts)
    if (decay is None) == (window is None):
      raise ValueError(f"give exactly one of decay (EMA) or window (sliding window), got {decay=}, {window=}")
    if decay is not None:
      if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
      decay = float(decay)
      if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1), got {decay}")
    num_slots = 0 if window is None else check_positive_int("window", window)
    return cls(ema=jnp.zeros((num_layers, num_experts), jnp.float32),
               history=jnp.zeros((num_slots, num_layers, num_experts), jnp.int32),
               num_updates=jnp.zeros((), jnp.int32),
               decay=None if decay is None else float(decay))

  @property
  def shape(self) -> tuple[int, int]:
    """`(num_layers, num_experts)`."""
    return tuple(self.ema.shape)

  def update(self, counts: jax.Array) -> "ExpertLoad":
    """Adds one step's `[L, E]` int token counts (each in [0, 2**31)); returns the new tracker.

    Concrete counts are range-checked; traced ones cannot be and must not be negative.
    """
    counts, _ = checked_int_array("counts", counts, min_value=0)
    if tuple(counts.shape) != self.shape:
      raise ValueError(f"counts must be [num_layers, num_experts] = {self.shape}, got shape {counts.shape}")
    counts = counts.astype(jnp.int32)
    if self.decay is not None:
      ema = self.decay * self.ema + (1.0 - self.decay) * counts.astype(jnp.float32)
      return self.replace(ema=ema, num_updates=self.num_updates + 1)
    slot = self.num_updates % self.history.shape[0]
    return self.replace(history=self.history.at[slot].set(counts), num_updates=self.num_updates + 1)

  def loads(self) -> jax.Array:
    """`[L, E]` float32 estimated tokens per step for each expert (zeros before any update)."""
    if self.decay is not None:
      correction = 1.0 - jnp.float32(self.decay) ** self.num_updates.astype(jnp.float32)
      return jnp.where(self.num_updates > 0, self.ema / jnp.where(correction > 0, correction, 1.0), 0.0)
    filled = jnp.minimum(self.num_updates, self.history.shape[0])
    total = self.history.astype(jnp.float32).sum(0)
    return total / jnp.maximum(filled, 1).astype(jnp.float32)
