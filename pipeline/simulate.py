"""Times a `Schedule` with per-op costs: makespan, each rank's bubble and peak activations, and the timeline.

Model: each rank runs its ops in order, one at a time; an op starts when the rank is free and
its inputs exist (a forward needs the previous stage's forward of the same micro-batch; a
backward needs this stage's forward and the next stage's backward); communication is free.
Costs: `F` a forward, `B` a full backward, `W` its weight-gradient part (so a zero-bubble
backward costs `B - W` and its deferred `W` costs `W`), `FB` an overlapped forward/backward pair.

Bubble of a rank: the makespan minus the time it computes. Activations: a forward's output is
held from the forward until its (input-gradient) backward, counted in micro-batch stages.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline.schedule import Schedule, parse


class Span(NamedTuple):
  """One op as it ran."""
  op: str
  start: float
  end: float
  forward: tuple[int, int] | None  # (direction, micro-batch) of the forward part
  backward: tuple[int, int] | None  # (direction, micro-batch) of the backward part


class Simulation(NamedTuple):
  makespan: float
  bubble: tuple[float, ...]  # per rank: idle time within the makespan
  peak_activations: tuple[int, ...]  # per rank: most forward outputs held at once
  timeline: tuple[tuple[Span, ...], ...]  # per rank, in order


def simulate_schedule(schedule: Schedule, *, F: float, B: float, W: float, FB: float) -> Simulation:
  """Runs `schedule` in time; ValueError naming the rank and op when it cannot run (see `Schedule.validate`)."""
  for name, value in (("F", F), ("B", B), ("W", W), ("FB", FB)):
    if not value >= 0:
      raise ValueError(f"{name} must be a non-negative cost, got {value}")
  if W > B:
    raise ValueError(f"W={W} is part of B={B}, so it cannot exceed it")
  where = {}  # (rank, phase) -> (direction, stage)
  for d, stages in enumerate(schedule.directions):
    for s, rank_phase in enumerate(stages):
      where[rank_phase] = (d, s)
  num_ranks = schedule.num_ranks
  ops = [[parse(op) for op in schedule.rank_ops[r]] for r in range(num_ranks)]
  for r in range(num_ranks):
    for text, op in zip(schedule.rank_ops[r], ops[r]):
      for phase in (op.forward, op.backward):
        if phase is not None and (r, phase) not in where:
          raise ValueError(f"rank {r} runs {text}, but holds no chunk {phase} in schedule {schedule.name}")

  forward_done: dict[tuple[int, int, int], float] = {}  # (direction, stage, micro-batch) -> time
  backward_done: dict[tuple[int, int, int], float] = {}
  next_forward = {key: 0 for key in where}  # per (rank, phase): index of its next micro-batch
  next_backward = {key: 0 for key in where}
  deferred = [[] for _ in range(num_ranks)]  # per rank: pending weight gradients (FIFO)
  position = [0] * num_ranks
  clock = [0.0] * num_ranks
  busy = [0.0] * num_ranks
  held = [0] * num_ranks
  peak = [0] * num_ranks
  timeline = [[] for _ in range(num_ranks)]

  def micro_batch(rank, phase, counter, text=None):
    """The micro-batch the chunk's next forward (or backward) runs; ValueError if it has run them all."""
    d, _ = where[(rank, phase)]
    k = counter[(rank, phase)]
    batches = schedule.micro_batches[d]
    if k >= len(batches):
      kind = "forward" if counter is next_forward else "backward"
      raise ValueError(f"rank {rank} op {position[rank]} ({text}): chunk {phase} has no micro-batch left to run "
                       f"{kind}")
    return batches[k]

  def ready_time(rank, op, text):
    """When the op's inputs exist, or None if one does not exist yet."""
    times = [clock[rank]]
    if op.forward is not None:
      m = micro_batch(rank, op.forward, next_forward, text)
      d, s = where[(rank, op.forward)]
      if s > 0:
        if (d, s - 1, m) not in forward_done:
          return None
        times.append(forward_done[(d, s - 1, m)])
    if op.backward is not None:
      m = micro_batch(rank, op.backward, next_backward, text)
      d, s = where[(rank, op.backward)]
      if (d, s, m) not in forward_done:
        raise ValueError(f"rank {rank} op {position[rank]} ({text}): backward of micro-batch {m} before its forward "
                         f"on this stage")
      if s + 1 < len(schedule.directions[d]):
        if (d, s + 1, m) not in backward_done:
          return None
        times.append(backward_done[(d, s + 1, m)])
    if op.weight and not deferred[rank]:
      raise ValueError(f"rank {rank} op {position[rank]} (W): no deferred weight gradient to run")
    return max(times)

  def cost(op):
    if op.weight:
      return W
    if op.overlapped:  # DualPipe's notation has no zero-bubble overlapped pair
      return FB
    if op.forward is not None:
      return F
    return B - W if op.zero_bubble else B

  remaining = sum(len(o) for o in ops)
  while remaining:
    progressed = False
    for r in range(num_ranks):
      while position[r] < len(ops[r]):
        op, text = ops[r][position[r]], schedule.rank_ops[r][position[r]]
        start = ready_time(r, op, text)
        if start is None:
          break
        end = start + cost(op)
        f_key = b_key = None
        if op.forward is not None:
          d, s = where[(r, op.forward)]
          m = micro_batch(r, op.forward, next_forward)
          next_forward[(r, op.forward)] += 1
          forward_done[(d, s, m)] = end
          f_key = (d, m)
          held[r] += 1
          peak[r] = max(peak[r], held[r])
        if op.backward is not None:
          d, s = where[(r, op.backward)]
          m = micro_batch(r, op.backward, next_backward)
          next_backward[(r, op.backward)] += 1
          backward_done[(d, s, m)] = end
          b_key = (d, m)
          held[r] -= 1
          if op.zero_bubble:
            deferred[r].append(b_key)
        if op.weight:
          deferred[r].pop(0)
        timeline[r].append(Span(text, start, end, f_key, b_key))
        clock[r] = end
        busy[r] += end - start
        position[r] += 1
        remaining -= 1
        progressed = True
    if not progressed:
      waiting = [f"rank {r} at op {position[r]} ({schedule.rank_ops[r][position[r]]})"
                 for r in range(num_ranks) if position[r] < len(ops[r])]
      raise ValueError(f"schedule {schedule.name} deadlocks: every remaining rank waits for an input that never "
                       f"comes: {'; '.join(waiting)}")

  for (r, phase), (d, _) in where.items():
    expected = len(schedule.micro_batches[d])
    for kind, counter in (("forward", next_forward), ("backward", next_backward)):
      if counter[(r, phase)] != expected:
        raise ValueError(f"rank {r} ran {counter[(r, phase)]} {kind}s of chunk {phase}, expected {expected}")
  for r in range(num_ranks):
    if deferred[r]:
      raise ValueError(f"rank {r} leaves {len(deferred[r])} deferred weight gradients without a W")
  makespan = max(clock) if clock else 0.0
  return Simulation(makespan, tuple(makespan - b for b in busy), tuple(peak), tuple(tuple(t) for t in timeline))
