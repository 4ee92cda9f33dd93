"""Laying a model out after a rebalance: expert weights into physical slots, tokens onto replicas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from balancer.validation import checked_int_array


def apply_placement(expert_params, phy2log):
  """Gathers logical-expert weights into physical slots.

  Args:
    expert_params: a pytree whose leaves carry the logical-expert axis: `[E, ...]` when
      `phy2log` is `[R]`, or `[L, E, ...]` (layers stacked) when `phy2log` is `[L, R]`.
      numpy leaves give numpy results, jax leaves jax results.
    phy2log: `[R]` or `[L, R]` int, the logical expert of each physical slot (from
      `rebalance_experts`). Jittable; concrete ids are checked to lie in `[0, E)`.

  Returns:
    The same pytree with `[R, ...]` (or `[L, R, ...]`) leaves: slot s holds a copy of the
    weights of expert `phy2log[s]`.
  """
  leaves, treedef = jax.tree.flatten(expert_params)
  if not leaves:
    raise ValueError("expert_params has no array leaves")
  phy2log_array, ids = checked_int_array("phy2log", phy2log, min_value=0)
  index_ndim = phy2log_array.ndim
  if index_ndim not in (1, 2):
    raise ValueError(f"phy2log must be [num_replicas] or [num_layers, num_replicas], got shape {phy2log_array.shape}")
  expert_axis = index_ndim - 1
  num_experts = None
  for path, leaf in jax.tree_util.tree_flatten_with_path(expert_params)[0]:
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path) or "leaf"
    if len(shape) <= expert_axis or (index_ndim == 2 and shape[0] != phy2log_array.shape[0]):
      raise ValueError(f"expert_params{name} has shape {shape}; with phy2log of shape {phy2log_array.shape} "
                       f"every leaf needs a leading {'[L, E]' if index_ndim == 2 else '[E]'} axis")
    if num_experts is None:
      num_experts = shape[expert_axis]
    elif shape[expert_axis] != num_experts:
      raise ValueError(f"expert_params{name} has {shape[expert_axis]} experts, other leaves {num_experts}")
  if ids is not None and ids.size and ids.max() >= num_experts:
    raise ValueError(f"phy2log holds expert ids outside [0, {num_experts})")

  def gather(leaf):
    xp = np if isinstance(leaf, np.ndarray) and ids is not None else jnp
    index = ids if xp is np else phy2log_array
    leaf = leaf if xp is np else jnp.asarray(leaf)  # numpy leaves cannot take a traced index
    if index_ndim == 1:
      return leaf[index]
    return leaf[xp.arange(leaf.shape[0])[:, None], index]

  return jax.tree.unflatten(treedef, [gather(leaf) for leaf in leaves])


def select_replicas(topk_idx, log2phy, logcnt, *, offset=0) -> jax.Array:
  """Routes each (token, expert) pair to one physical replica of that expert.

  The pairs routed to expert e take its replicas round-robin in token order: the i-th such
  pair goes to replica `(offset + i) % logcnt[e]`, so the replicas' token counts differ by at
  most one. Jittable (a stable sort of the `T*K` ids).

  Args:
    topk_idx: `[T, K]` int logical expert ids; -1 = no expert. Concrete ids are checked to lie
      in `[-1, E)`; traced ones cannot be, and ids past E - 1 then route to expert E - 1.
    log2phy: `[E, maxcnt]` int, the slots of each expert, -1 padded (one layer of
      `rebalance_experts`' output).
    logcnt: `[E]` int, replicas per expert.
    offset: non-negative int scalar that shifts where the round-robin starts; give each EP
      rank its own (its rank index, say) so ranks with few tokens do not all favour replica 0.

  Returns:
    `[T, K]` int32 physical slot ids; -1 where `topk_idx` is -1.
  """
  log2phy, slots = checked_int_array("log2phy", log2phy, min_value=-1)
  if log2phy.ndim != 2:
    raise ValueError(f"log2phy must be [num_experts, maxcnt] (one layer), got shape {log2phy.shape}")
  num_experts, max_count = log2phy.shape
  logcnt, counts = checked_int_array("logcnt", logcnt, min_value=1, max_value=max_count)
  if logcnt.shape != (num_experts,):
    raise ValueError(f"logcnt must be [num_experts={num_experts}], got shape {logcnt.shape}")
  if slots is not None and counts is not None:
    listed = np.arange(max_count)[None, :] < counts[:, None]
    if (slots[listed] < 0).any():
      raise ValueError("log2phy has -1 among the first logcnt[e] slots of some expert; they disagree")
  topk_idx, _ = checked_int_array("topk_idx", topk_idx, min_value=-1, max_value=num_experts - 1)
  if topk_idx.ndim != 2:
    raise ValueError(f"topk_idx must be [num_tokens, num_topk], got shape {topk_idx.shape}")
  offset, _ = checked_int_array("offset", offset, min_value=0)
  if offset.ndim != 0:
    raise ValueError(f"offset must be an int scalar, got shape {offset.shape}")
  flat = jnp.where(topk_idx >= 0, topk_idx, num_experts).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_ids = flat[order]
  rank_sorted = jnp.arange(flat.size) - jnp.searchsorted(sorted_ids, sorted_ids, side="left")
  rank = jnp.zeros_like(flat).at[order].set(rank_sorted.astype(flat.dtype)).reshape(topk_idx.shape)
  expert = jnp.minimum(jnp.maximum(topk_idx, 0), num_experts - 1)
  replica = (offset + rank) % jnp.maximum(logcnt[expert], 1)
  slot = log2phy[expert, replica].astype(jnp.int32)
  return jnp.where(topk_idx >= 0, slot, -1)
