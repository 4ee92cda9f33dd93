"""Draws a schedule's timeline as a PNG, like DualPipe's figure: ranks as rows, micro-batches as cells.

  python -m pipeline.render --schedule dualpipe --ranks 8 --chunks 20 OUT.png

Each op is a box as long as its simulated cost (`Schedule.simulate`), labelled with its
micro-batch. Colour says what it is: forwards in one hue per direction, backwards in a darker
one, deferred weight gradients (`W`) grey; an overlapped forward/backward pair is one box split
diagonally into its two colours with a heavy border, so the pairs stand out.
"""

from __future__ import annotations

import os

from absl import app, flags

from pipeline.schedule import Schedule
from pipeline.schedules import SCHEDULES

# Per direction: (forward, backward) colours; DualPipe's two directions are orange and blue.
_COLOURS = (("#f6b26b", "#b45f06"), ("#6fa8dc", "#0b5394"))
_WEIGHT = "#bbbbbb"


def render(schedule: Schedule, path: str | os.PathLike, *, F: float = 1.0, B: float = 2.0, W: float = 1.0,
           FB: float | None = None, title: str | None = None) -> None:
  """Writes the timeline of `schedule` (costs as in `Schedule.simulate`) to `path` as a PNG."""
  import matplotlib
  matplotlib.use("Agg")  # files only: no screen needed
  import matplotlib.pyplot as plt
  from matplotlib.patches import Polygon, Rectangle

  sim = schedule.simulate(F=F, B=B, W=W, FB=FB)
  rows = schedule.num_ranks
  fig, ax = plt.subplots(figsize=(max(8.0, sim.makespan * 0.35), 0.6 * rows + 1.6))
  for rank, spans in enumerate(sim.timeline):
    y = rows - 1 - rank
    for span in spans:
      width = span.end - span.start
      if span.forward is None and span.backward is None:  # W
        ax.add_patch(Rectangle((span.start, y), width, 0.9, facecolor=_WEIGHT, edgecolor="white", linewidth=0.5))
        ax.text(span.start + width / 2, y + 0.45, "W", ha="center", va="center", fontsize=6)
        continue
      if span.forward is not None and span.backward is not None:  # an overlapped pair
        f_colour = _COLOURS[span.forward[0] % 2][0]
        b_colour = _COLOURS[span.backward[0] % 2][1]
        x0, x1 = span.start, span.end
        ax.add_patch(Polygon([(x0, y), (x1, y), (x0, y + 0.9)], facecolor=f_colour, linewidth=0))
        ax.add_patch(Polygon([(x1, y), (x1, y + 0.9), (x0, y + 0.9)], facecolor=b_colour, linewidth=0))
        ax.add_patch(Rectangle((x0, y), width, 0.9, fill=False, edgecolor="black", linewidth=1.5))
        label = f"{span.forward[1]}|{span.backward[1]}"
      else:
        direction, batch = span.forward or span.backward
        colour = _COLOURS[direction % 2][0 if span.forward else 1]
        hatch = "//" if span.op.endswith("zb") else None  # input-gradient only
        ax.add_patch(Rectangle((span.start, y), width, 0.9, facecolor=colour, edgecolor="white", linewidth=0.5,
                               hatch=hatch))
        label = str(batch)
      ax.text(span.start + width / 2, y + 0.45, label, ha="center", va="center", fontsize=6, color="black")
  ax.set_xlim(0, sim.makespan)
  ax.set_ylim(-0.2, rows)
  ax.set_yticks([rows - 1 - r + 0.45 for r in range(rows)], [f"rank {r}" for r in range(rows)])
  ax.set_xlabel(f"time (F={F:g}, B={B:g}, W={W:g}, F&B={F + B if FB is None else FB:g}); "
                f"bubble per rank max {max(sim.bubble):g}, activations max {max(sim.peak_activations)}")
  ax.set_title(title or f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_chunks} micro-batches")
  for spine in ("top", "right"):
    ax.spines[spine].set_visible(False)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=150)
  plt.close(fig)


def _define_flags() -> None:
  """Flags of the command line only: importing this module (as `pipeline` does) defines none."""
  flags.DEFINE_enum("schedule", "dualpipe", sorted(SCHEDULES), "which schedule to draw")
  flags.DEFINE_integer("ranks", 8, "pipeline ranks")
  flags.DEFINE_integer("chunks", 20, "micro-batches per step")
  flags.DEFINE_float("F", 1.0, "cost of a forward")
  flags.DEFINE_float("B", 2.0, "cost of a full backward")
  flags.DEFINE_float("W", 1.0, "cost of the weight-gradient part of a backward")
  flags.DEFINE_float("FB", None, "cost of an overlapped forward/backward pair (default F + B)")


def main(argv):
  FLAGS = flags.FLAGS
  if len(argv) != 2:
    raise app.UsageError("usage: python -m pipeline.render [--schedule ...] OUT.png")
  try:
    schedule = SCHEDULES[FLAGS.schedule](FLAGS.ranks, FLAGS.chunks)
    render(schedule, argv[1], F=FLAGS.F, B=FLAGS.B, W=FLAGS.W, FB=FLAGS.FB)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  print(f"wrote {argv[1]}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
