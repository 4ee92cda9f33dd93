"""Pipeline parallelism: DualPipe, DualPipeV and their baselines as schedules, and their executor (rebuilds DualPipe).

Built:
- `pipeline.schedules`: `one_f_one_b`, `zb1p`, `dualpipe`, `dualpipev`, each
  `(num_ranks, num_chunks) -> Schedule`; `Schedule.ops(rank)` in DualPipe's notation.
- `Schedule.validate` / `Schedule.simulate`: makespan, bubble and peak activations per rank.
- `pipeline.render`: the timeline as a PNG (also `python -m pipeline.render`).
- `pipeline.executor.pipeline_step`: any schedule for one training step under `jax.shard_map`
  on a `pp` axis (`make_plan` lays it out in ticks; `layout_params` / `collect_grads` map
  per-stage parameters to ranks' chunks and back).
- `pipeline.trainer.Trainer` and `python -m pipeline.train`: DeepSeek-V3 presets trained on a
  `pp x ep` mesh (`pipeline.model_stages` cuts the model; `pipeline.data` reads the text).
"""

from pipeline.executor import collect_grads, layout_params, pipeline_step
from pipeline.plan import Plan, make_plan
from pipeline.render import render
from pipeline.schedule import Op, Schedule, parse
from pipeline.schedules import SCHEDULES, dualpipe, dualpipev, one_f_one_b, zb1p
from pipeline.simulate import Simulation, Span

__all__ = ["SCHEDULES", "Op", "Plan", "Schedule", "Simulation", "Span", "collect_grads", "dualpipe", "dualpipev",
           "layout_params", "make_plan", "one_f_one_b", "parse", "pipeline_step", "render", "zb1p"]
