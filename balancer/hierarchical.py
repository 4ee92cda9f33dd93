"""DeepSeek's hierarchical EPLB policy, vectorised across layers.

Three steps: pack expert groups onto nodes, replicate experts inside each node, pack the
replicas onto the node's GPUs. The global policy is this one with one group and one node.

Index spaces, named as in the steps:
  log   logical expert id, `[0, E)`.
  mlog  "meta-logical" id: experts renumbered node-major after step 1, so node n owns
        `[n*E/N, (n+1)*E/N)`.
  phy   replica slot inside a node after step 2.
  pphy  physical slot after step 3; GPU g owns `[g*R/P, (g+1)*R/P)`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from balancer.packing import balanced_packing
from balancer.replication import replicate_experts


class Placement(NamedTuple):
  """One placement of replicas onto physical slots, for every layer.

  Attributes:
    phy2log: `[L, R]` int64, the logical expert held by each physical slot.
    replica_rank: `[L, R]` int64, which replica of its expert each slot holds.
    logcnt: `[L, E]` int64, replicas per logical expert.
    expert_node: `[L, E]` int64, the node that hosts every replica of each expert.
  """

  phy2log: np.ndarray
  replica_rank: np.ndarray
  logcnt: np.ndarray
  expert_node: np.ndarray


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """Inverts each row of a `[rows, n]` int permutation."""
  inverse = np.empty_like(perm)
  np.put_along_axis(inverse, perm, np.arange(perm.shape[-1], dtype=perm.dtype)[None, :], axis=-1)
  return inverse


def group_loads(weight: np.ndarray, num_groups: int) -> np.ndarray:
  """Sums `[L, E]` float32 loads over contiguous groups of `E/num_groups` experts.

  The sum runs in float32 in member order, so it does not depend on numpy's reduction order.

  Returns:
    `[L, num_groups]` float32.
  """
  num_layers, num_experts = weight.shape
  members = weight.reshape(num_layers, num_groups, num_experts // num_groups)
  total = members[:, :, 0].copy()
  for j in range(1, members.shape[-1]):
    total += members[:, :, j]
  return total


def rebalance_hierarchical(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> Placement:
  """Runs the hierarchical policy on validated input.

  Args:
    weight: `[L, E]` float32 loads.
    num_replicas: R, physical slots per layer; a multiple of `num_gpus`, at least E.
    num_groups: expert groups; divides E and is a multiple of `num_nodes`.
    num_nodes: server nodes; divides `num_gpus`.
    num_gpus: P, GPUs in all.

  Returns:
    The `Placement`.
  """
  num_layers, num_experts = weight.shape
  group_size = num_experts // num_groups
  groups_per_node = num_groups // num_nodes
  experts_per_node = num_experts // num_nodes
  replicas_per_node = num_replicas // num_nodes
  replicas_per_gpu = num_replicas // num_gpus
  gpus_per_node = num_gpus // num_nodes

  # Step 1: groups onto nodes. A group's experts stay contiguous in mlog order.
  group_node, group_rank = balanced_packing(group_loads(weight, num_groups), num_nodes)
  group_start = (group_node * groups_per_node + group_rank) * group_size
  log2mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(num_layers, num_experts)
  mlog2log = inverse_permutation(log2mlog)

  # Step 2: replicas inside each node; one row per (layer, node).
  mlog_load = np.take_along_axis(weight, mlog2log, axis=-1).reshape(num_layers * num_nodes, experts_per_node)
  phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, replicas_per_node)

  # Step 3: the node's replicas onto its GPUs, by load per replica.
  replica_load = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, axis=-1)
  gpu_index, rank_in_gpu = balanced_packing(replica_load, gpus_per_node)
  pphy2phy = inverse_permutation(gpu_index * replicas_per_gpu + rank_in_gpu)

  pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1).reshape(num_layers, num_nodes, replicas_per_node)
  pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * experts_per_node)[None, :, None]).reshape(num_layers, -1)
  phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
  replica_rank = np.take_along_axis(phy_rank, pphy2phy, axis=-1).reshape(num_layers, num_replicas)
  logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, num_experts), log2mlog, axis=-1)
  expert_node = np.repeat(group_node, group_size, axis=-1)
  return Placement(phy2log, replica_rank, logcnt, expert_node)
