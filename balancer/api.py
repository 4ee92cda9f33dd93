"""`rebalance_experts`: DeepSeek's EPLB in numpy, with an optional local-search refinement."""

from __future__ import annotations

import numpy as np

from balancer.hierarchical import rebalance_hierarchical
from balancer.quality import count_replicas, unchecked_gpu_loads
from balancer.refine import refine_placement
from balancer.validation import check_rebalance_args


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                      refine: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Places `num_replicas` replicas of the logical experts onto `num_gpus` GPUs, per layer.

  Hierarchical policy when `num_groups % num_nodes == 0`: expert groups are packed onto nodes,
  experts are replicated within each node, and the replicas are packed onto the node's GPUs.
  Otherwise the global policy: the same with one group and one node. With `refine=False` the
  result is DeepSeek's EPLB for the same input, with ties broken deterministically (stable
  sorts, first index on ties, float32 load sums; DeepSeek's unstable `torch.sort` may order
  tied loads differently). With `refine=True` a local search (swaps, and moving redundant
  replicas) lowers each layer's hottest GPU further; it keeps the node constraint and never
  raises a layer's peak GPU load, so no layer's balancedness gets worse.

  Example (DeepSeek's README):
    >>> weight = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    ...           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    >>> phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    >>> phy2log[0].tolist()
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]

  Args:
    weight: `[num_layers, num_logical_experts]` int or float loads (numpy, jax or lists);
      finite and non-negative.
    num_replicas: R, physical expert slots per layer; a multiple of `num_gpus`, at least the
      number of logical experts.
    num_groups: expert groups (DeepSeek-V3: 8); must divide the number of experts.
    num_nodes: server nodes; must divide `num_gpus`.
    num_gpus: P, GPUs in all. GPU g owns slots `[g*R/P, (g+1)*R/P)`; node n owns GPUs
      `[n*P/N, (n+1)*P/N)`.
    refine: improve the greedy placement by local search.

  Returns:
    `phy2log`: `[L, R]` int64, the logical expert held by each physical slot.
    `log2phy`: `[L, E, maxcnt]` int64, the physical slots of each logical expert, padded with
      -1; maxcnt is the largest replica count over all layers.
    `logcnt`: `[L, E]` int64, the number of replicas of each logical expert (>= 1).

  Raises:
    ValueError: naming the argument, for a wrong shape or dtype, negative, NaN or infinite
      loads, or sizes that do not divide as above.
  """
  weight, num_replicas, num_groups, num_nodes, num_gpus = check_rebalance_args(
      weight, num_replicas, num_groups, num_nodes, num_gpus)
  if not isinstance(refine, (bool, np.bool_)):
    raise ValueError(f"refine must be a bool, got {refine!r}")
  if num_groups % num_nodes:
    num_groups, num_nodes = 1, 1
  placement = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
  phy2log, replica_rank, logcnt = placement.phy2log, placement.replica_rank, placement.logcnt
  if refine:
    refined = refine_placement(weight, phy2log, placement.expert_node, num_nodes, num_gpus)
    refined_logcnt = count_replicas(refined, weight.shape[1])
    # Take a refined row only if it moved something and its peak is no higher (the search never
    # raises it; this guards the promise). An equal peak still means fewer GPUs near it.
    greedy_peak = unchecked_gpu_loads(weight.astype(np.float64), phy2log, logcnt, num_gpus).max(-1)
    refined_peak = unchecked_gpu_loads(weight.astype(np.float64), refined, refined_logcnt, num_gpus).max(-1)
    better = (refined != phy2log).any(-1) & (refined_peak <= greedy_peak)
    phy2log = np.where(better[:, None], refined, phy2log)
    logcnt = np.where(better[:, None], refined_logcnt, logcnt)
    replica_rank = np.where(better[:, None], slot_order_ranks(refined), replica_rank)
  return phy2log, build_log2phy(phy2log, replica_rank, logcnt), logcnt


def slot_order_ranks(phy2log: np.ndarray) -> np.ndarray:
  """`[L, R]` int64: the k-th slot (in slot order) holding an expert gets replica rank k."""
  num_layers, num_replicas = phy2log.shape
  order = np.argsort(phy2log, axis=-1, kind="stable")
  sorted_experts = np.take_along_axis(phy2log, order, axis=-1)
  position = np.arange(num_replicas)[None, :]
  starts_run = np.concatenate([np.ones((num_layers, 1), bool), sorted_experts[:, 1:] != sorted_experts[:, :-1]], -1)
  run_start = np.maximum.accumulate(np.where(starts_run, position, 0), axis=-1)
  ranks = np.empty_like(phy2log)
  np.put_along_axis(ranks, order, position - run_start, axis=-1)
  return ranks


def build_log2phy(phy2log: np.ndarray, replica_rank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
  """Inverts a placement: `[L, E, maxcnt]` int64 slots per expert, ordered by replica rank, -1 padded."""
  num_layers, num_replicas = phy2log.shape
  num_experts = logcnt.shape[1]
  max_count = int(logcnt.max())
  log2phy = np.full((num_layers, num_experts * max_count), -1, np.int64)
  np.put_along_axis(log2phy, phy2log * max_count + replica_rank,
                    np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log.shape), axis=-1)
  return log2phy.reshape(num_layers, num_experts, max_count)
