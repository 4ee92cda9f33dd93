"""Pipelined training steps: the trainer on several `pp x ep` meshes and schedules against one device without a pipeline.

  python -m benchmarks.bench_pipeline [--steps=4] [--seq_len=64]

Every case trains the `demo` preset (1 dense + 4 MoE layers, one MTP module) on the same
token windows: 32 sequences per step, as 4 micro-batches of 8 (DualPipe on 4 ranks needs 8
micro-batches: 8 of 4). It reports the first step's seconds
(tracing and compiling the whole step), the median of the following steps, tokens/s, the
plan's ticks and buffer depth (micro-batches one rank holds at once), and step time against
the baseline, one device with no pipeline, run in the same process. On a CPU host every fake
device shares the same cores, so the ratios show the executor's overhead (lockstep ticks,
collectives, bookkeeping), not a pipeline's speed-up; absolute figures count on GPUs only.
"""

from __future__ import annotations

import os
import statistics
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

from absl import app, flags  # noqa: E402

from benchmarks.harness import append_results, format_table  # noqa: E402

CASES = [  # (label, TrainConfig overrides); the first is the baseline
    ("1 device, no pipeline", dict(pp=1, ep=1, schedule="1f1b")),
    ("1 device, FP8 projections", dict(pp=1, ep=1, schedule="1f1b", fp8=True)),
    ("pp=2 1F1B", dict(pp=2, ep=1, schedule="1f1b")),
    ("pp=2 DualPipeV", dict(pp=2, ep=1, schedule="dualpipev")),
    ("pp=4 DualPipe (8 x 4 sequences)", dict(pp=4, ep=1, schedule="dualpipe", chunks=8, micro_batch=4)),
    ("pp=2 x ep=4 DualPipeV", dict(pp=2, ep=4, schedule="dualpipev")),
]


def run(steps: int = 4, seq_len: int = 64) -> list[dict]:
  import jax

  from pipeline.data import TokenCorpus
  from pipeline.trainer import TrainConfig, Trainer
  corpus = TokenCorpus(max_bytes=4 << 20)
  rows = []
  for label, overrides in CASES:
    needs = overrides["pp"] * overrides["ep"]
    if needs > jax.device_count():
      rows.append({"suite": "pipeline", "case": label, "note": f"skipped: needs {needs} devices"})
      continue
    config = TrainConfig(**{"chunks": 4, "micro_batch": 8, **overrides}, seq_len=seq_len, steps=steps + 2,
                         warmup_steps=1)
    trainer = Trainer(config)
    batches = [corpus.batch(s, config.chunks * config.micro_batch, seq_len) for s in range(steps + 1)]
    begin = time.perf_counter()
    trainer.step(batches[0])
    first = time.perf_counter() - begin
    times = []
    for windows in batches[1:]:
      begin = time.perf_counter()
      trainer.step(windows)  # returns host floats: the step has finished
      times.append(time.perf_counter() - begin)
    step_s = statistics.median(times)
    rows.append({"suite": "pipeline", "case": label, "first step s": round(first, 2), "step s": round(step_s, 3),
                 "tokens/s": round(config.chunks * config.micro_batch * seq_len / step_s),
                 "ticks": len(trainer.plan.ticks), "slots": trainer.plan.slots})
  base = rows[0]["step s"]
  for row in rows:
    if "step s" in row:
      row["time vs baseline"] = round(row["step s"] / base, 2)
  return rows


FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 4, "timed steps per case (after the compiling one)")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.steps, FLAGS.seq_len)
  append_results("pipeline", rows, command="python -m benchmarks.bench_pipeline")
  print(format_table(rows, ["case", "first step s", "step s", "tokens/s", "ticks", "slots", "time vs baseline"]))


if __name__ == "__main__":
  app.run(main)
