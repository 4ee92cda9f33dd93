"""Replica allocation: each redundant slot goes to the expert with the highest load per replica."""

from __future__ import annotations

import numpy as np


def replicate_experts(weight: np.ndarray, num_replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Spreads `num_replicas` physical slots over the logical experts of every row.

  Slots `0..num_experts-1` hold one replica of each expert in order; every further slot goes to
  `argmax(weight / count)` (float32, first index on ties). Vectorised across rows; the loop
  runs over the redundant slots only.

  Args:
    weight: `[num_rows, num_experts]` float32 loads.
    num_replicas: physical slots per row, `>= num_experts`.

  Returns:
    `phy2log`: `[num_rows, num_replicas]` int64, the logical expert of each slot.
    `replica_rank`: `[num_rows, num_replicas]` int64, which replica of its expert a slot holds.
    `logcnt`: `[num_rows, num_experts]` int64, replicas per expert.
  """
  num_rows, num_experts = weight.shape
  rows = np.arange(num_rows)
  phy2log = np.broadcast_to(np.arange(num_replicas, dtype=np.int64), (num_rows, num_replicas)).copy()
  replica_rank = np.zeros((num_rows, num_replicas), np.int64)
  logcnt = np.ones((num_rows, num_experts), np.int64)
  load_per_replica = weight.astype(np.float32, copy=True)
  for slot in range(num_experts, num_replicas):
    expert = np.argmax(load_per_replica, axis=-1)
    phy2log[:, slot] = expert
    replica_rank[:, slot] = logcnt[rows, expert]
    logcnt[rows, expert] += 1
    # Only the chosen expert's ratio changes; the division matches a full recompute bit for bit.
    load_per_replica[rows, expert] = weight[rows, expert] / logcnt[rows, expert].astype(np.float32)
  return phy2log, replica_rank, logcnt
