"""The schedules as data: DeepSeek's DualPipe order, DualPipeV's relation to it, validation, and DualPipe's bubble and memory table."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from pipeline import schedules
from pipeline.schedule import Schedule, parse

# DualPipe's own example (PP = 4, 8 micro-batches, rank 0), from DeepSeek's description.
RANK0_PP4_C8 = "F0 F0 F0 F1 B1zb W F1 F0&B1 F1&B0 B1 F1&B0 B1 B0zb W B0zb W".split()


def test_dualpipe_rank0_is_deepseeks_order():
  assert schedules.dualpipe(4, 8).ops(0) == RANK0_PP4_C8


@pytest.mark.parametrize("ranks, chunks", [(2, 4), (4, 8), (4, 12), (6, 20), (8, 16), (8, 20)])
def test_dualpipe_invariants(ranks, chunks):
  s = schedules.dualpipe(ranks, chunks)
  half = chunks // 2
  for r in range(ranks):
    counts = collections.Counter()
    for op in s.ops(r):
      parsed = parse(op)
      if parsed.forward is not None:
        counts[f"F{parsed.forward}"] += 1
      if parsed.backward is not None:
        counts[f"B{parsed.backward}"] += 1
        counts["zb"] += parsed.zero_bubble
      counts["W"] += parsed.weight
    assert [counts[k] for k in ("F0", "F1", "B0", "B1")] == [half] * 4, r
    assert counts["W"] == counts["zb"] > 0, r
    # The middle ranks do not overlap their first pair; the others do.
    middle = r in (ranks // 2 - 1, ranks // 2)
    first_overlap = next(i for i, op in enumerate(s.ops(r)) if "&" in op)
    assert (s.ops(r)[first_overlap - 1] in ("B1", "B0")) == middle, r
  s.validate()


@pytest.mark.parametrize("ranks, chunks", [(1, 2), (2, 4), (3, 6), (4, 10), (4, 12)])
def test_dualpipev_is_the_first_half_of_dualpipe_on_twice_the_ranks(ranks, chunks):
  v = schedules.dualpipev(ranks, chunks)
  d = schedules.dualpipe(2 * ranks, 2 * chunks)
  for r in range(ranks):
    assert v.ops(r) == d.ops(r), r
  v.validate()
  # One V: down through chunk 0, back up through chunk 1.
  assert v.directions[0][:ranks] == tuple((r, 0) for r in range(ranks))
  assert v.directions[0][ranks:] == tuple((r, 1) for r in reversed(range(ranks)))


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("ranks, chunks", [(2, 4), (4, 8), (4, 20), (8, 16)])
def test_every_schedule_validates(name, ranks, chunks):
  schedules.SCHEDULES[name](ranks, chunks).validate()


def _with_ops(s: Schedule, rank: int, ops: list[str]) -> Schedule:
  rank_ops = list(s.rank_ops)
  rank_ops[rank] = tuple(ops)
  return dataclasses.replace(s, rank_ops=tuple(rank_ops))


def test_validate_names_what_is_wrong():
  s = schedules.one_f_one_b(4, 8)
  ops = s.ops(1)
  with pytest.raises(ValueError, match="rank 1 op 0 .*backward of micro-batch 0 before its forward"):
    _with_ops(s, 1, ["B0"] + [op for i, op in enumerate(ops) if i != ops.index("B0")]).validate()
  alone = schedules.one_f_one_b(1, 8)  # one rank: F0 B0 eight times; drop the final pair
  with pytest.raises(ValueError, match="rank 0 ran 7 forwards of chunk 0, expected 8"):
    _with_ops(alone, 0, alone.ops(0)[:-2]).validate()
  with pytest.raises(ValueError, match="op 'F2' is not one of"):
    _with_ops(s, 2, ["F2"]).validate()
  with pytest.raises(ValueError, match="no deferred weight gradient"):
    _with_ops(s, 3, ["W"] + s.ops(3)).validate()
  zb = schedules.zb1p(4, 8)
  with pytest.raises(ValueError, match="leaves 1 deferred weight gradients"):
    _with_ops(zb, 2, zb.ops(2)[:-1]).validate()
  with pytest.raises(ValueError, match="holds no chunk 1"):
    _with_ops(s, 0, ["F1"] + s.ops(0)).validate()
  with pytest.raises(ValueError, match="must hold each of 0..7 once"):
    dataclasses.replace(s, micro_batches=((0, 1, 2, 3, 4, 5, 6, 6),)).validate()
  # Rank 0 waiting for its backward before its forwards have gone out: nobody can move.
  first = s.ops(0)
  stuck = ["F0", "B0"] + [op for op in first if op != "F0"][1:] + ["F0"] * (first.count("F0") - 1)
  with pytest.raises(ValueError, match="deadlocks.*rank 0 at op 1 \\(B0\\)"):
    _with_ops(s, 0, stuck).validate()


@pytest.mark.parametrize("bad, match", [
    (lambda: schedules.dualpipe(3, 12), "num_ranks must be even"),
    (lambda: schedules.dualpipe(4, 6), "num_chunks must be even and >= 8"),
    (lambda: schedules.dualpipev(4, 7), "num_chunks must be >= 8"),
    (lambda: schedules.one_f_one_b(0, 4), "num_ranks must be a positive int"),
    (lambda: schedules.zb1p(4, True), "num_chunks must be a positive int"),
    (lambda: schedules.dualpipe(4, 8).ops(4), "rank must be in"),
    (lambda: schedules.one_f_one_b(2, 4).simulate(F=1, B=1, W=2), "cannot exceed"),
])
def test_bad_arguments_name_themselves(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


# DualPipe's table (PP stages): bubble and activations per device. Its bubble formulas hold
# exactly when a forward, an input-gradient backward and a weight-gradient backward cost the
# same (F = W, B = 2W), the premise of the table; the simulator times any costs.
@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("fb", [2.0, 2.5, 3.0])
def test_dualpipe_bubble_and_memory_table(pp, fb):
  F, B, W = 1.0, 2.0, 1.0
  chunks = 3 * pp
  rows = {
      "1f1b": (schedules.one_f_one_b(pp, chunks), (pp - 1) * (F + B), pp),
      "zb1p": (schedules.zb1p(pp, chunks), (pp - 1) * (F + B - 2 * W), pp),
      "dualpipe": (schedules.dualpipe(pp, 2 * chunks), (pp / 2 - 1) * (fb + B - 3 * W), pp + 1),
      # DualPipeV: PP stages on PP / 2 devices.
      "dualpipev": (schedules.dualpipev(pp // 2, chunks), (pp / 2 - 1) * (fb + B - 3 * W), pp + 1),
  }
  for name, (schedule, bubble, activations) in rows.items():
    sim = schedule.simulate(F=F, B=B, W=W, FB=fb)
    assert max(sim.bubble) == pytest.approx(bubble), name
    assert max(sim.peak_activations) == activations, name


def test_simulation_with_other_costs_orders_the_schedules():
  # Away from the table's premise the formulas are estimates; the order of the schedules holds.
  F, B, W, FB = 1.0, 2.0, 0.7, 2.5
  bubble = {name: max(fn(8, 32).simulate(F=F, B=B, W=W, FB=FB).bubble) for name, fn in schedules.SCHEDULES.items()
            if name != "dualpipev"}
  assert bubble["dualpipe"] < bubble["zb1p"] < bubble["1f1b"]
  assert bubble["1f1b"] == pytest.approx(7 * (F + B)) and bubble["zb1p"] == pytest.approx(7 * (F + B - 2 * W))
