"""A schedule laid out in ticks for SPMD execution: what every rank computes at each tick, and what moves between ticks.

Under `jax.shard_map` every rank runs the same program, so the executor walks a global clock:
at tick t, rank r runs `ticks[t][r]` (or idles), then the tick's sends go out (`ppermute` to
the next or previous rank, or a local hand-off where a V turns on one rank) and land in the
receivers' buffers for a later tick. A tick is assigned to each op as early as its rank and
its inputs allow: one after the rank's previous op, and one after the op that produced its
input. Everything here is static Python, fixed at trace time.

Buffers are indexed by `slot`. Each rank reuses its slots, for both its chunks: a micro-batch holds one
from the tick its activation arrives (or, on a first stage, its forward) to the tick of its
last use (its backward, or its deferred `W`), and slots are handed out greedily in tick order,
so the buffers hold as many micro-batches as are in flight at once (DualPipe's point), not
all of them. A slot last read at tick t is taken again by an activation arriving at the end
of t (after t's reads), or by a first stage's forward from t + 1, so a tick's forward and
backward (an `F&B` step) never share one.
"""

from __future__ import annotations

import dataclasses

from pipeline.schedule import Schedule, parse


@dataclasses.dataclass(frozen=True)
class Step:
  """One rank's op at one tick (`kind` "idle" when it has none)."""
  kind: str  # "idle", "F", "B", "W", "FB"
  f_phase: int = -1  # forward: local chunk and slot
  f_slot: int = -1
  b_phase: int = -1  # backward (or W): local chunk and slot
  b_slot: int = -1
  zero_bubble: bool = False  # the backward is input-gradient only (its W comes later)
  first: bool = False  # the forward's chunk is the first stage: its input is the micro-batch itself
  last: bool = False  # the forward's chunk is the last stage: the loss is taken here
  micro_batch: int = -1  # the forward's global micro-batch id (inputs and labels are indexed by it)
  b_first: bool = False  # the backward's chunk is the first stage: its input gradient is the micro-batch's
  b_micro_batch: int = -1  # the backward's global micro-batch id


@dataclasses.dataclass(frozen=True)
class Transfer:
  """A tensor one rank sends at the end of a tick: an activation forward or a gradient back."""
  src: int
  dst: int
  dst_phase: int
  slot: int
  gradient: bool  # False: an activation (lands in the receiver's input buffer), True: an output gradient


@dataclasses.dataclass(frozen=True)
class Plan:
  schedule: Schedule
  num_phases: int  # local chunks per rank (1 or 2)
  slots: int  # buffer depth: the most micro-batches one rank holds at once (over its chunks)
  ticks: tuple[tuple[Step, ...], ...]  # [tick][rank]
  transfers: tuple[tuple[Transfer, ...], ...]  # [tick]: sent at the end of that tick
  last_stage: tuple[tuple[int, int], ...]  # per direction: (rank, phase) of its last stage


def make_plan(schedule: Schedule) -> Plan:
  """Lays `schedule` out in ticks; ValueError if it cannot run (`Schedule.validate`'s checks)."""
  schedule.validate()
  where = {}
  for d, stages in enumerate(schedule.directions):
    for s, rank_phase in enumerate(stages):
      where[rank_phase] = (d, s)
  num_phases = 1 + max(phase for _, phase in where)
  num_ranks = schedule.num_ranks
  # Keyed by (direction, stage, k), k a micro-batch's index within its direction; `Step` and
  # `Transfer` carry k as their slot until the relabelling below turns it into a pool slot.
  forward_tick: dict[tuple[int, int, int], int] = {}  # -> tick
  backward_tick: dict[tuple[int, int, int], int] = {}
  next_f = {key: 0 for key in where}
  next_b = {key: 0 for key in where}
  deferred = [[] for _ in range(num_ranks)]
  weight_tick: dict[tuple[int, int, int], int] = {}  # (rank, phase, k) -> tick of its deferred W
  placed: dict[tuple[int, int], Step] = {}  # (tick, rank) -> step
  sends: dict[int, list[Transfer]] = {}
  last_tick = [-1] * num_ranks
  position = [0] * num_ranks
  ops = [[parse(op) for op in schedule.rank_ops[r]] for r in range(num_ranks)]

  def earliest(r, op):
    tick = last_tick[r] + 1
    if op.forward is not None:
      d, s = where[(r, op.forward)]
      k = next_f[(r, op.forward)]
      if s > 0:
        if (d, s - 1, k) not in forward_tick:
          return None
        tick = max(tick, forward_tick[(d, s - 1, k)] + 1)
    if op.backward is not None:
      d, s = where[(r, op.backward)]
      k = next_b[(r, op.backward)]
      tick = max(tick, forward_tick[(d, s, k)] + 1)
      if s + 1 < len(schedule.directions[d]):
        if (d, s + 1, k) not in backward_tick:
          return None
        tick = max(tick, backward_tick[(d, s + 1, k)] + 1)
    return tick

  remaining = sum(len(o) for o in ops)
  while remaining:
    for r in range(num_ranks):
      while position[r] < len(ops[r]):
        op = ops[r][position[r]]
        tick = earliest(r, op)
        if tick is None:
          break
        fields = {}
        if op.forward is not None:
          d, s = where[(r, op.forward)]
          k = next_f[(r, op.forward)]
          next_f[(r, op.forward)] += 1
          forward_tick[(d, s, k)] = tick
          stages = schedule.directions[d]
          fields.update(f_phase=op.forward, f_slot=k, first=s == 0, last=s + 1 == len(stages),
                        micro_batch=schedule.micro_batches[d][k])
          if s + 1 < len(stages):
            dst, dst_phase = stages[s + 1]
            sends.setdefault(tick, []).append(Transfer(r, dst, dst_phase, k, gradient=False))
        if op.backward is not None:
          d, s = where[(r, op.backward)]
          k = next_b[(r, op.backward)]
          next_b[(r, op.backward)] += 1
          backward_tick[(d, s, k)] = tick
          fields.update(b_phase=op.backward, b_slot=k, zero_bubble=op.zero_bubble, b_first=s == 0,
                        b_micro_batch=schedule.micro_batches[d][k])
          if op.zero_bubble:
            deferred[r].append((op.backward, k))
          if s > 0:
            src_rank, src_phase = schedule.directions[d][s - 1]
            sends.setdefault(tick, []).append(Transfer(r, src_rank, src_phase, k, gradient=True))
        if op.weight:
          phase, k = deferred[r].pop(0)
          fields.update(b_phase=phase, b_slot=k)
          weight_tick[(r, phase, k)] = tick
        kind = "W" if op.weight else "FB" if op.overlapped else "F" if op.forward is not None else "B"
        placed[(tick, r)] = Step(kind, **fields)
        last_tick[r] = tick
        position[r] += 1
        remaining -= 1
  # Liveness of micro-batch k's buffers on (rank, phase), then greedy slots per rank in order of first write.
  lifetimes = {}
  for d, stages in enumerate(schedule.directions):
    for s, (r, phase) in enumerate(stages):
      for k in range(len(schedule.micro_batches[d])):
        # After a first stage, the activation lands at the end of the sender's tick, after that
        # tick's reads; a first stage's forward writes its residuals during its tick.
        arrives = s > 0
        first = forward_tick[(d, s - 1, k)] if arrives else forward_tick[(d, s, k)]
        last = weight_tick.get((r, phase, k), backward_tick[(d, s, k)])
        lifetimes[(r, phase, k)] = (first, not arrives, last)
  slot_of, depth = {}, 1
  for r in range(num_ranks):
    free_at: list[int] = []  # per slot: the last tick it is read
    for key in sorted((key for key in lifetimes if key[0] == r), key=lambda key: lifetimes[key]):
      first, during_tick, last = lifetimes[key]
      # A slot read last at tick t takes an arrival written at the end of t, a forward's write from t + 1.
      slot = next((i for i, busy_until in enumerate(free_at) if busy_until + during_tick <= first), len(free_at))
      if slot == len(free_at):
        free_at.append(last)
      free_at[slot] = last
      slot_of[key] = slot
    depth = max(depth, len(free_at))

  def relabel(step: Step, r: int) -> Step:
    changes = {}
    if step.f_slot >= 0:
      changes["f_slot"] = slot_of[(r, step.f_phase, step.f_slot)]
    if step.b_slot >= 0:
      changes["b_slot"] = slot_of[(r, step.b_phase, step.b_slot)]
    return dataclasses.replace(step, **changes)

  num_ticks = 1 + max(tick for tick, _ in placed)
  ticks = tuple(tuple(relabel(placed[(t, r)], r) if (t, r) in placed else Step("idle") for r in range(num_ranks))
                for t in range(num_ticks))
  transfers = tuple(tuple(dataclasses.replace(tr, slot=slot_of[(tr.dst, tr.dst_phase, tr.slot)])
                          for tr in sends.get(t, ())) for t in range(num_ticks))
  last_stage = tuple(stages[-1] for stages in schedule.directions)
  return Plan(schedule, num_phases, depth, ticks, transfers, last_stage)
