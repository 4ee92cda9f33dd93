"""A pipeline schedule as data: each rank's compute ops in order, in DualPipe's notation, plus where stages live.

Ops (strings):

| op | meaning |
|---|---|
| `"F0"`, `"F1"` | forward of local chunk (phase) 0 or 1 |
| `"B0"`, `"B1"` | full backward |
| `"B0zb"`, `"B1zb"` | backward of the input gradient only, the weight gradient deferred |
| `"W"` | one deferred weight-gradient step (first in, first out) |
| `"F0&B1"`, `"F1&B0"` | an overlapped forward/backward pair |

Topology: micro-batches flow along *directions*. Direction d is a list of stages, each a
`(rank, phase)`; its micro-batches enter stage 0 in order, and every stage runs them in that
order (a rank's k-th `F{phase}` is the k-th micro-batch of that chunk; so is its k-th backward).
Activations go from stage s to s + 1 after a forward, gradients from s + 1 to s after a
backward. Sends and receives are implied by that order, so they match by construction; what can
still be wrong is the order of ops, which `validate` checks by running it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

_OP = re.compile(r"^(?:F(?P<f>[01])|B(?P<b>[01])(?P<zb>zb)?|(?P<w>W)|F(?P<pf>[01])&B(?P<pb>[01]))$")


class Op(NamedTuple):
  """One parsed op: what runs, on which local chunk (phase)."""
  forward: int | None  # phase of the forward, or None
  backward: int | None  # phase of the backward, or None
  zero_bubble: bool = False  # the backward is input-gradient only (its W comes later)
  weight: bool = False  # a deferred weight-gradient step

  @property
  def overlapped(self) -> bool:
    return self.forward is not None and self.backward is not None


def parse(op: str) -> Op:
  """`"F0&B1"` -> `Op(forward=0, backward=1)`; ValueError naming the op if it is not DualPipe's notation."""
  match = _OP.match(op) if isinstance(op, str) else None
  if match is None:
    raise ValueError(f"op {op!r} is not one of F0 F1 B0 B1 B0zb B1zb W F0&B1 F1&B0 (and F0&B0, F1&B1)")
  if match["w"]:
    return Op(None, None, weight=True)
  if match["f"] is not None:
    return Op(int(match["f"]), None)
  if match["b"] is not None:
    return Op(None, int(match["b"]), zero_bubble=bool(match["zb"]))
  return Op(int(match["pf"]), int(match["pb"]))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every rank's ops, and the directions micro-batches take through the ranks' chunks.

  Attributes:
    name: e.g. "dualpipe".
    num_ranks: pipeline ranks.
    num_chunks: micro-batches in one step (over every direction).
    directions: per direction, its stages as `(rank, phase)` in flow order.
    micro_batches: per direction, the micro-batch ids it carries, in order.
    rank_ops: per rank, its ops in execution order.
  """
  name: str
  num_ranks: int
  num_chunks: int
  directions: tuple[tuple[tuple[int, int], ...], ...]
  micro_batches: tuple[tuple[int, ...], ...]
  rank_ops: tuple[tuple[str, ...], ...]

  def ops(self, rank: int) -> list[str]:
    """Rank `rank`'s compute ops in execution order."""
    if not 0 <= rank < self.num_ranks:
      raise ValueError(f"rank must be in [0, {self.num_ranks}), got {rank}")
    return list(self.rank_ops[rank])

  def stage_of(self, rank: int, phase: int) -> tuple[int, int]:
    """`(direction, stage index)` of local chunk `phase` on `rank`; ValueError if the rank has no such chunk."""
    for d, stages in enumerate(self.directions):
      for s, where in enumerate(stages):
        if where == (rank, phase):
          return d, s
    raise ValueError(f"rank {rank} holds no chunk {phase} in schedule {self.name}")

  def validate(self) -> None:
    """Checks the schedule can run and is complete; ValueError saying which rank and op is wrong.

    - every op parses, and every chunk a rank runs exists in the topology;
    - each chunk runs exactly one forward and one backward per micro-batch of its direction;
    - each rank runs as many `W` as zero-bubble backwards, never before its backward;
    - run in order with each op waiting for its inputs (a micro-batch's forward before its
      backward on each stage, the previous stage's forward, the next stage's backward), every
      rank finishes: no rank waits forever.
    """
    seen = [m for batches in self.micro_batches for m in batches]
    if sorted(seen) != list(range(self.num_chunks)):
      raise ValueError(f"schedule {self.name}: micro_batches must hold each of 0..{self.num_chunks - 1} once, "
                       f"got {self.micro_batches}")
    if len(self.directions) != len(self.micro_batches) or len(self.rank_ops) != self.num_ranks:
      raise ValueError(f"schedule {self.name}: {len(self.directions)} directions with {len(self.micro_batches)} "
                       f"micro-batch lists, {len(self.rank_ops)} op lists for {self.num_ranks} ranks")
    from pipeline.simulate import simulate_schedule  # the same walk times it
    simulate_schedule(self, F=1.0, B=2.0, W=1.0, FB=3.0)

  def simulate(self, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None):
    """Times the schedule with per-op costs; see `pipeline.simulate.simulate_schedule`."""
    from pipeline.simulate import simulate_schedule
    return simulate_schedule(self, F=F, B=B, W=W, FB=F + B if FB is None else FB)
