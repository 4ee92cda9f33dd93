"""Balanced packing: equal-count bins, greedy heaviest-first into the lightest open bin."""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
  """Packs the items of every row into `num_packs` bins of equal item count.

  Items are taken heaviest first (a stable descending sort, so equal weights keep index order)
  and each goes to the lightest bin that still has room, the lowest-numbered one on ties.
  Bin loads accumulate in float32. With one item per bin the packing is the identity, as in
  DeepSeek's EPLB. Rows are independent; the loop runs over items, vectorised across rows.

  Args:
    weight: `[num_rows, num_items]` float32 item weights; `num_items % num_packs == 0`.
    num_packs: number of bins per row.

  Returns:
    `(pack_index, rank_in_pack)`, both `[num_rows, num_items]` int64: the bin of each item and
    its position inside that bin (the order in which it was placed).
  """
  num_rows, num_items = weight.shape
  items_per_pack = num_items // num_packs
  if items_per_pack == 1:
    pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
    return pack_index, np.zeros_like(pack_index)

  order = np.argsort(-weight, axis=-1, kind="stable")
  rows = np.arange(num_rows)
  pack_load = np.zeros((num_rows, num_packs), np.float32)
  pack_count = np.zeros((num_rows, num_packs), np.int64)
  pack_index = np.empty((num_rows, num_items), np.int64)
  rank_in_pack = np.empty((num_rows, num_items), np.int64)
  for step in range(num_items):
    item = order[:, step]
    # Full bins read as +inf; an open bin always exists because capacity equals num_items.
    pack = np.argmin(np.where(pack_count < items_per_pack, pack_load, np.inf), axis=-1)
    pack_index[rows, item] = pack
    rank_in_pack[rows, item] = pack_count[rows, pack]
    pack_load[rows, pack] += weight[rows, item]
    pack_count[rows, pack] += 1
  return pack_index, rank_in_pack
