"""How good a placement is: per-GPU load and balancedness (max GPU load over mean GPU load)."""

from __future__ import annotations

import numpy as np

from balancer.validation import as_load_matrix, check_positive_int


def count_replicas(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
  """`[L, R]` int slots -> `[L, E]` int64 replicas per logical expert."""
  counts = np.zeros((phy2log.shape[0], num_experts), np.int64)
  np.add.at(counts, (np.arange(phy2log.shape[0])[:, None], phy2log), 1)
  return counts


def _check_placement(weight, phy2log, logcnt, num_gpus):
  weight = as_load_matrix(weight).astype(np.float64)
  num_gpus = check_positive_int("num_gpus", num_gpus)
  try:
    phy2log, logcnt = np.asarray(phy2log), np.asarray(logcnt)
  except ValueError as err:
    raise ValueError(f"phy2log and logcnt must be rectangular int arrays: {err}") from None
  num_layers, num_experts = weight.shape
  if phy2log.ndim != 2 or phy2log.shape[0] != num_layers or phy2log.dtype.kind not in "iu":
    raise ValueError(f"phy2log must be an int [num_layers={num_layers}, num_replicas] array, "
                     f"got {phy2log.dtype} {phy2log.shape}")
  if logcnt.shape != weight.shape or logcnt.dtype.kind not in "iu":
    raise ValueError(f"logcnt must be an int array shaped like weight {weight.shape}, "
                     f"got {logcnt.dtype} {logcnt.shape}")
  if phy2log.shape[1] % num_gpus:
    raise ValueError(f"{num_gpus=} must divide the number of physical slots, {phy2log.shape[1]}")
  if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
    raise ValueError(f"phy2log holds expert ids outside [0, {num_experts})")
  counted = count_replicas(phy2log, num_experts)
  if (counted == 0).any():
    layer, expert = (int(i) for i in np.argwhere(counted == 0)[0])
    raise ValueError(f"phy2log gives {int((counted == 0).sum())} experts no replica, e.g. expert {expert} "
                     f"in layer {layer}; its load would go nowhere")
  if not np.array_equal(counted, logcnt):
    layer = int(np.argwhere((counted != logcnt).any(-1))[0, 0])
    raise ValueError(f"logcnt disagrees with the replicas counted in phy2log (first at layer {layer})")
  return weight, phy2log, logcnt, num_gpus


def gpu_loads(weight, phy2log, logcnt, num_gpus: int) -> np.ndarray:
  """The load each GPU carries when every replica of an expert takes an equal share.

  Args:
    weight: `[L, E]` int or float loads per logical expert.
    phy2log: `[L, R]` int, the logical expert of each physical slot; GPU g owns slots
      `[g*R/num_gpus, (g+1)*R/num_gpus)`.
    logcnt: `[L, E]` int, replicas per expert; must equal the counts in `phy2log`.
    num_gpus: P, dividing R.

  Returns:
    `[L, P]` float64: the sum over a GPU's slots of `weight[e] / logcnt[e]`.
  """
  weight, phy2log, logcnt, num_gpus = _check_placement(weight, phy2log, logcnt, num_gpus)
  return unchecked_gpu_loads(weight, phy2log, logcnt, num_gpus)


def unchecked_gpu_loads(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> np.ndarray:
  """`gpu_loads` for callers that have validated their arrays: `[L, E]` float64 weight in, `[L, P]` out."""
  share = weight / np.maximum(logcnt, 1)
  slot_load = np.take_along_axis(share, phy2log, axis=-1)
  return slot_load.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def balancedness(weight, phy2log, logcnt, num_gpus: int) -> np.ndarray:
  """Per layer, the maximum GPU load over the mean GPU load (1.0 is perfect).

  Args are as for `gpu_loads`. The mean is the layer's total load over `num_gpus`, the same
  for every placement of that layer, so two placements compare exactly by their peaks. A
  layer with no load at all counts as perfectly balanced.

  Returns:
    `[L]` float64, each >= 1.
  """
  loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
  return _ratio(loads, as_load_matrix(weight).astype(np.float64))


def _ratio(loads: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """`[L, P]` GPU loads and `[L, E]` float64 weight -> `[L]` peak over mean."""
  mean = weight.sum(-1) / loads.shape[-1]
  peak = loads.max(-1)
  return np.where(mean > 0, np.maximum(peak / np.where(mean > 0, mean, 1.0), 1.0), 1.0)


def unbalanced_baseline(weight, num_gpus: int) -> np.ndarray:
  """Balancedness with no redundant experts and the default layout: expert e on GPU `e*P // E`.

  Args:
    weight: `[L, E]` int or float loads.
    num_gpus: P; when it does not divide E, GPUs hold `floor` or `ceil` of E/P experts.

  Returns:
    `[L]` float64.
  """
  weight = as_load_matrix(weight).astype(np.float64)
  num_gpus = check_positive_int("num_gpus", num_gpus)
  num_layers, num_experts = weight.shape
  gpu_of_expert = np.arange(num_experts) * num_gpus // num_experts
  loads = np.zeros((num_layers, num_gpus))
  np.add.at(loads, (slice(None), gpu_of_expert), weight)
  return _ratio(loads, weight)
