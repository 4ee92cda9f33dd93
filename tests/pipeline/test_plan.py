"""The plan's buffer slots: replayed tick by tick, no micro-batch's data is overwritten before its last use, and depth stays bounded."""

from __future__ import annotations

import pytest

from pipeline import schedules
from pipeline.plan import make_plan


def _replay(plan) -> None:
  """Runs the plan on a model of each rank's slot pool; AssertionError at the first clobbered or wrong read."""
  ranks = plan.schedule.num_ranks
  held = [dict() for _ in range(ranks)]  # rank -> {slot: (phase, micro_batch)} of live data
  deferred = [[] for _ in range(ranks)]  # rank -> [(slot, tag)] awaiting their W

  def claim(r, slot, tag, t):
    assert 0 <= slot < plan.slots, (t, r, slot)
    assert held[r].get(slot, tag) == tag, f"tick {t} rank {r}: slot {slot} holds {held[r][slot]}, {tag} overwrites it"
    held[r][slot] = tag

  def read(r, slot, tag, t):
    assert held[r].get(slot) == tag, f"tick {t} rank {r}: slot {slot} holds {held[r].get(slot)}, {tag} expected"

  for t, steps in enumerate(plan.ticks):
    for r, step in enumerate(steps):
      if step.kind in ("F", "FB"):
        tag = (step.f_phase, step.micro_batch)
        (claim if step.first else read)(r, step.f_slot, tag, t)  # the input (or, first, the residuals)
      if step.kind in ("B", "FB"):
        tag = (step.b_phase, step.b_micro_batch)
        read(r, step.b_slot, tag, t)  # residuals and output gradient
        if step.zero_bubble:
          deferred[r].append((step.b_slot, tag))
        else:
          del held[r][step.b_slot]
      if step.kind == "W":
        slot, tag = deferred[r].pop(0)
        assert (step.b_phase, step.b_slot) == (tag[0], slot), (t, r)
        read(r, slot, tag, t)
        del held[r][slot]
    for tr in plan.transfers[t]:
      sender = steps[tr.src]
      tag = (tr.dst_phase, sender.b_micro_batch if tr.gradient else sender.micro_batch)
      (read if tr.gradient else claim)(tr.dst, tr.slot, tag, t)  # a gradient lands where its forward's data is
  assert all(not h for h in held) and all(not d for d in deferred), "data left unused"


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("ranks", [2, 4, 6, 8])
def test_no_live_slot_is_overwritten(name, ranks):
  for chunks in (ranks * 2, ranks * 2 + 2, ranks * 5):
    try:
      schedule = schedules.SCHEDULES[name](ranks, chunks)
    except ValueError:
      continue  # a chunk count this schedule does not take
    _replay(make_plan(schedule))


def test_depth_is_the_micro_batches_in_flight_not_the_chunk_count():
  # One more than the simulated peak of forward outputs held: an arriving activation takes its
  # slot a tick before its forward runs.
  for chunks in (20, 40):
    schedule = schedules.dualpipe(8, chunks)
    assert make_plan(schedule).slots == max(schedule.simulate().peak_activations) + 1 == 10
  assert make_plan(schedules.one_f_one_b(4, 12)).slots == 4
