"""FlashMLA's scheduling loop written as plain Python, one partition and one request at a time."""

from __future__ import annotations

import numpy as np


def schedule(seqlens, num_sm_parts: int, overhead: int = 5, page: int = 64):
  """Returns (metadata [num_sm_parts, 8], num_splits [b + 1]) as numpy int arrays."""
  batch = len(seqlens)
  num_blocks = [-(-int(s) // page) for s in seqlens]
  total = sum(n + overhead for n in num_blocks)
  payload = -(-total // num_sm_parts) + overhead
  req = block = split = cum = 0
  num_splits = [0] * (batch + 1)
  rows = []
  for _ in range(num_sm_parts):
    begin = (req, block, split, block != 0)
    remain = payload
    while req < batch:
      left = num_blocks[req] - block
      if remain >= left + overhead:
        cum += split + 1
        num_splits[req + 1] = cum
        remain -= left + overhead
        req, block, split = req + 1, 0, 0
      else:
        if remain - overhead > 0:
          block += remain - overhead
          split += 1
          remain = 0
        break
    end_req = req if block > 0 else req - 1
    end_block = block if block > 0 else num_blocks[req - 1]
    last_splitted = end_block != num_blocks[end_req]
    first_splitted = begin[3]
    if begin[0] == end_req:
      first_splitted = last_splitted = first_splitted or last_splitted
    rows.append([begin[0], end_req, begin[1], end_block, begin[2], int(first_splitted), int(last_splitted), 0])
  assert req == batch and block == 0 and split == 0, "the payload did not cover every block"
  return np.array(rows, np.int32), np.array(num_splits, np.int32)
