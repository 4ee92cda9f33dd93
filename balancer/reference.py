"""A plain, one-layer-at-a-time EPLB in Python loops: the oracle for the vectorised path.

Same signature and results as `rebalance_experts(..., refine=False)`. It is written for
reading, not speed; tests compare the two bit for bit and the benchmark uses it as baseline.
Loads are numpy float32 scalars throughout, so sums and ratios round as in the fast path.
"""

from __future__ import annotations

import numpy as np

from balancer.validation import check_rebalance_args


def _pack(weights: list, num_packs: int) -> tuple[list[int], list[int]]:
  """Heaviest first into the lightest open bin; identity when each bin takes one item."""
  per_pack = len(weights) // num_packs
  if per_pack == 1:
    return list(range(len(weights))), [0] * len(weights)
  order = sorted(range(len(weights)), key=lambda i: -weights[i])  # Python's sort is stable.
  bin_load = [np.float32(0)] * num_packs
  bin_size = [0] * num_packs
  bin_of, rank_of = [0] * len(weights), [0] * len(weights)
  for item in order:
    best = None
    for b in range(num_packs):
      if bin_size[b] < per_pack and (best is None or bin_load[b] < bin_load[best]):
        best = b
    bin_of[item], rank_of[item] = best, bin_size[best]
    bin_load[best] = np.float32(bin_load[best] + weights[item])
    bin_size[best] += 1
  return bin_of, rank_of


def _replicate(weights: list, num_slots: int) -> tuple[list[int], list[int], list[int]]:
  """One slot per expert, then each extra slot to the expert with the most load per replica."""
  count = [1] * len(weights)
  slot_expert, slot_rank = list(range(len(weights))), [0] * len(weights)
  for _ in range(len(weights), num_slots):
    ratios = [np.float32(w) / np.float32(c) for w, c in zip(weights, count)]
    best = 0
    for e in range(1, len(ratios)):
      if ratios[e] > ratios[best]:
        best = e
    slot_expert.append(best)
    slot_rank.append(count[best])
    count[best] += 1
  return slot_expert, slot_rank, count


def _one_layer(loads: list, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
  num_experts = len(loads)
  group_size = num_experts // num_groups
  per_node_slots = num_replicas // num_nodes
  gpus_per_node = num_gpus // num_nodes
  slots_per_gpu = num_replicas // num_gpus

  group_totals = []
  for g in range(num_groups):
    total = np.float32(0)
    for e in range(g * group_size, (g + 1) * group_size):
      total = np.float32(total + loads[e])
    group_totals.append(total)
  group_node, group_rank = _pack(group_totals, num_nodes)

  phy2log = [0] * num_replicas
  replica_rank = [0] * num_replicas
  logcnt = [0] * num_experts
  for node in range(num_nodes):
    # The node's experts, ordered by the group's rank inside the node.
    node_groups = sorted((g for g in range(num_groups) if group_node[g] == node), key=lambda g: group_rank[g])
    experts = [e for g in node_groups for e in range(g * group_size, (g + 1) * group_size)]
    slot_expert, slot_rank, count = _replicate([loads[e] for e in experts], per_node_slots)
    for local, e in enumerate(experts):
      logcnt[e] = count[local]
    shares = [np.float32(loads[experts[i]]) / np.float32(count[i]) for i in slot_expert]
    gpu_of, rank_in_gpu = _pack(shares, gpus_per_node)
    for j in range(per_node_slots):
      slot = node * per_node_slots + gpu_of[j] * slots_per_gpu + rank_in_gpu[j]
      phy2log[slot] = experts[slot_expert[j]]
      replica_rank[slot] = slot_rank[j]
  return phy2log, replica_rank, logcnt


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
  """See `balancer.rebalance_experts`; returns the same `(phy2log, log2phy, logcnt)`."""
  weight, num_replicas, num_groups, num_nodes, num_gpus = check_rebalance_args(
      weight, num_replicas, num_groups, num_nodes, num_gpus)
  if num_groups % num_nodes:
    num_groups, num_nodes = 1, 1
  layers = [_one_layer(list(row), num_replicas, num_groups, num_nodes, num_gpus) for row in weight]
  phy2log = np.array([layer[0] for layer in layers], np.int64)
  replica_rank = np.array([layer[1] for layer in layers], np.int64)
  logcnt = np.array([layer[2] for layer in layers], np.int64)
  max_count = int(logcnt.max())
  log2phy = np.full(logcnt.shape + (max_count,), -1, np.int64)
  for layer in range(phy2log.shape[0]):
    for slot in range(num_replicas):
      log2phy[layer, phy2log[layer, slot], replica_rank[layer, slot]] = slot
  return phy2log, log2phy, logcnt
