"""`python -m benchmarks`: every suite, one table, results appended under benchmarks/results/.

Suites so far: balancer (CPU, numpy), fp8 (the xla GEMMs against bf16; DeepGEMM's shapes on a
GPU, scaled down on CPU) and mla (split-KV decode against the dense oracle; FlashMLA's cases on a
GPU), ffi (the dispatch custom calls against their jnp references), ep (expert-parallel dispatch
and combine against an all_gather dispatch, on 8 fake CPU devices), storage (a local
cluster against local files), checkpoint (`model.from_pretrained` against reading whole
shards, each in a fresh process) and pipeline (the trainer's step on pp x ep meshes against
one device without a pipeline). The Hopper kernels are timed on a lent GPU by
`python -m benchmarks.gpu` (ceilings, GPU tests, then fp8 and mla against their xla paths).
"""

import os
import sys

# The ep suite needs several devices: 8 fake CPU devices on a CPU host (no effect on GPUs).
# Before any suite imports jax; the other suites time against baselines in the same process.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

from absl import app  # noqa: E402

from benchmarks import (bench_balancer, bench_checkpoint, bench_ep, bench_ffi, bench_fp8, bench_graysort,  # noqa: E402
                        bench_kvcache, bench_mla, bench_pipeline, bench_sharded_checkpoint,
                        bench_storage, serve_load)
from benchmarks.harness import append_results, format_table  # noqa: E402

SUITES = {"balancer": bench_balancer.run, "fp8": bench_fp8.run, "mla": bench_mla.run, "ffi": bench_ffi.run,
          "ep": bench_ep.run, "storage": bench_storage.run, "checkpoint": bench_checkpoint.run,
          "pipeline": bench_pipeline.run, "graysort": bench_graysort.run,
          "kvcache": bench_kvcache.run, "sharded_checkpoint": bench_sharded_checkpoint.run,
          "serve": serve_load.run}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = []
  for name, run in SUITES.items():
    suite_rows = run()
    append_results(name, suite_rows, command="python -m benchmarks")
    rows += suite_rows
  columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("suite", "case")))
  print(format_table(rows, ["suite", "case", *columns]))


if __name__ == "__main__":
  app.run(main)
