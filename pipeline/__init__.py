"""Pipeline parallelism: DualPipe, DualPipeV and their baselines as schedules (rebuilds DualPipe).

Built: `pipeline.schedules` (`one_f_one_b`, `zb1p`, `dualpipe`, `dualpipev`, each
`(num_ranks, num_chunks) -> Schedule`), `Schedule.validate` / `Schedule.simulate` (makespan,
bubble and peak activations per rank), and `pipeline.render` (the timeline as a PNG; also
`python -m pipeline.render`). Still to come: the executor under `jax.shard_map` and the training
binary (`python -m pipeline.train`).
"""

from pipeline.render import render
from pipeline.schedule import Op, Schedule, parse
from pipeline.schedules import SCHEDULES, dualpipe, dualpipev, one_f_one_b, zb1p
from pipeline.simulate import Simulation, Span

__all__ = ["SCHEDULES", "Op", "Schedule", "Simulation", "Span", "dualpipe", "dualpipev", "one_f_one_b", "parse",
           "render", "zb1p"]
