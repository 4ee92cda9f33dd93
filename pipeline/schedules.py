"""The schedules: 1F1B, ZB1P (zero bubble, ZB-H1), DualPipe and DualPipeV, each `(num_ranks, num_chunks) -> Schedule`.

DualPipe and DualPipeV follow DeepSeek's algorithm step for step (eight steps per rank; the
middle ranks of DualPipe, the last of DualPipeV, do not overlap their first F/B pair; the
second half of step 6's backwards defer their weight gradients). Phases are local chunks: on
DualPipe rank r, chunk 0 is stage r of the direction that starts at rank 0 and chunk 1 is
stage P-1-r of the one that starts at rank P-1. (DeepSeek's code names phases relative to the
rank's half, `phase ^= rank >= P/2`; here they are already resolved to chunks.) On DualPipeV
rank r, chunk 0 is stage r and chunk 1 is stage 2P-1-r of the one V-shaped direction.
"""

from __future__ import annotations

from pipeline.schedule import Schedule


def _check(name: str, num_ranks: int, num_chunks: int, *, even_ranks: bool, min_chunks: int, even_chunks: bool):
  for arg, value in (("num_ranks", num_ranks), ("num_chunks", num_chunks)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
  if even_ranks and num_ranks % 2:
    raise ValueError(f"{name}: num_ranks must be even, got {num_ranks}")
  if num_chunks < min_chunks or (even_chunks and num_chunks % 2):
    raise ValueError(f"{name}: num_chunks must be {'even and ' if even_chunks else ''}>= {min_chunks} "
                     f"for {num_ranks} ranks, got {num_chunks}")


def _single_direction(name, num_ranks, num_chunks, rank_ops):
  return Schedule(name, num_ranks, num_chunks, directions=(tuple((r, 0) for r in range(num_ranks)),),
                  micro_batches=(tuple(range(num_chunks)),), rank_ops=tuple(tuple(o) for o in rank_ops))


def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
  """1F1B: rank r runs P-1-r warm-up forwards, then alternates forward and backward, then drains."""
  _check("1F1B", num_ranks, num_chunks, even_ranks=False, min_chunks=1, even_chunks=False)
  rank_ops = []
  for r in range(num_ranks):
    warmup = min(num_ranks - 1 - r, num_chunks)
    ops = ["F0"] * warmup
    for _ in range(num_chunks - warmup):
      ops += ["F0", "B0"]
    ops += ["B0"] * warmup
    rank_ops.append(ops)
  return _single_direction("1f1b", num_ranks, num_chunks, rank_ops)


def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
  """ZB1P (ZB-H1 of "Zero Bubble Pipeline Parallelism"): 1F1B's order with input-gradient backwards.

  Every backward is zero-bubble (`B0zb`): the gradient goes upstream as soon as the input
  gradient exists. Rank r keeps r weight gradients deferred (the last rank the most, P-1), so
  the drain, where rank r waits for gradients coming back through the ranks after it, is
  filled by its deferred `W`s. Activation memory stays 1F1B's (P-1-r warm-up forwards on rank r).
  """
  _check("ZB1P", num_ranks, num_chunks, even_ranks=False, min_chunks=1, even_chunks=False)
  rank_ops = []
  for r in range(num_ranks):
    warmup = min(num_ranks - 1 - r, num_chunks)
    ops = ["F0"] * warmup
    pending = 0  # zero-bubble backwards whose W has not run

    def backward():
      nonlocal pending
      ops.append("B0zb")
      pending += 1
      if pending > r:  # keep r deferred; run the oldest
        ops.append("W")
        pending -= 1
    for _ in range(num_chunks - warmup):
      ops.append("F0")
      backward()
    for _ in range(warmup):
      backward()
    ops += ["W"] * pending
    rank_ops.append(ops)
  return _single_direction("zb1p", num_ranks, num_chunks, rank_ops)


def _dual_ops(num_half_ranks: int, half_rank: int, half_num_chunks: int, middle: bool) -> list[str]:
  """DeepSeek's eight steps for one rank, in its relative phases (0: the direction starting at this rank's end)."""
  n, h, c = num_half_ranks, half_rank, half_num_chunks
  ops = ["F0"] * ((n - h - 1) * 2)  # step 1
  ops += ["F0", "F1"] * (h + 1)  # step 2
  ops += ["B1zb", "W", "F1"] * (n - h - 1)  # step 3
  for i in range(c - 2 * n + h + 1):  # step 4, the main step
    if i == 0 and middle:
      ops += ["F0", "B1"]  # not overlapped, to shrink the bubble
    else:
      ops.append("F0&B1")
    ops.append("F1&B0")
  ops += ["B1", "F1&B0"] * (n - h - 1)  # step 5
  zero_bubble = False  # step 6: the second half of its backwards defer their weight gradients
  for i in range(h + 1):
    if i == (h + 1) // 2 and h % 2 == 1:
      zero_bubble = True
    ops.append("B1zb" if zero_bubble else "B1")
    if i == (h + 1) // 2 and h % 2 == 0:
      zero_bubble = True
    ops.append("B0zb" if zero_bubble else "B0")
  ops += ["W", "B0zb"] * (n - h - 1)  # step 7
  ops += ["W"] * (h + 1)  # step 8
  return ops


def _flip(op: str) -> str:
  return op.replace("0", "#").replace("1", "0").replace("#", "1")


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
  """DualPipe on P (even) ranks: two directions of P stages, each carrying half of the micro-batches."""
  _check("DualPipe", num_ranks, num_chunks, even_ranks=True, min_chunks=2 * num_ranks, even_chunks=True)
  n, c = num_ranks // 2, num_chunks // 2
  rank_ops = []
  for r in range(num_ranks):
    h = min(r, num_ranks - 1 - r)
    ops = _dual_ops(n, h, c, middle=h == n - 1)
    rank_ops.append(ops if r < n else [_flip(op) for op in ops])
  directions = (tuple((r, 0) for r in range(num_ranks)), tuple((r, 1) for r in reversed(range(num_ranks))))
  return Schedule("dualpipe", num_ranks, num_chunks, directions=directions,
                  micro_batches=(tuple(range(c)), tuple(range(c, num_chunks))),
                  rank_ops=tuple(tuple(o) for o in rank_ops))


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
  """DualPipeV on P ranks: one V-shaped direction of 2P stages (down through chunk 0, back up through chunk 1)."""
  _check("DualPipeV", num_ranks, num_chunks, even_ranks=False, min_chunks=2 * num_ranks, even_chunks=False)
  rank_ops = [_dual_ops(num_ranks, r, num_chunks, middle=r == num_ranks - 1) for r in range(num_ranks)]
  stages = tuple((r, 0) for r in range(num_ranks)) + tuple((r, 1) for r in reversed(range(num_ranks)))
  return Schedule("dualpipev", num_ranks, num_chunks, directions=(stages,), micro_batches=(tuple(range(num_chunks)),),
                  rank_ops=tuple(tuple(o) for o in rank_ops))


SCHEDULES = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}
