"""`python -m benchmarks.gpu`: the one command for a lent GPU machine, shared by every kernel issue.

In one run, within about 8 minutes on an H200:
1. the card's two ceilings: device-to-device copy bandwidth and a large bf16 matmul through XLA;
2. the GPU tests (`pytest -m gpu`), at real shapes, with a time limit;
3. each kernel suite against its xla implementation on the same shapes in the same process
   (fp8: DeepGEMM's table with DeepGEMM's accounting; mla: FlashMLA's table with FlashMLA's;
   ep: DeepEP's shapes and byte accounting over the host's GPUs, against an all_gather dispatch;
   train: the trainer's step on the demo model, float and FP8 projections, on the meshes the
   host's GPUs allow, against one device without a pipeline).
It prints one table last and, when `$OUT` is set, writes `gpu_suite.json` there; results are
also appended under benchmarks/results/ like every benchmark.

  python -m benchmarks.gpu [--suites=fp8,mla,ep,train] [--tests_timeout_s=240] [--repeats=10] [--skip_tests]
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import bench_ep, bench_fp8, bench_mla, bench_pipeline
from benchmarks.harness import append_results, format_table, machine, time_fn

COPY_BYTES = 2 << 30  # large enough that caches do not matter
MATMUL_SIZE = 8192


def ceilings(repeats: int) -> list[dict]:
  """What the card can do at all: a copy's bandwidth and XLA's bf16 matmul rate."""
  x = jnp.zeros((COPY_BYTES // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)  # reads and writes every byte once
  t = time_fn(copy, x, repeats=repeats).median_s
  rows = [{"suite": "ceiling", "case": f"copy {COPY_BYTES >> 20} MiB d2d", "impl": "xla",
           "median_ms": round(t * 1e3, 3), "gb_s": round(2 * COPY_BYTES / t / 1e9, 1)}]
  a = jax.random.normal(jax.random.key(0), (MATMUL_SIZE, MATMUL_SIZE), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  t = time_fn(matmul, a, a, repeats=repeats).median_s
  rows.append({"suite": "ceiling", "case": f"bf16 matmul {MATMUL_SIZE}^3", "impl": "xla",
               "median_ms": round(t * 1e3, 3), "tflops": round(2 * MATMUL_SIZE ** 3 / t / 1e12, 1)})
  return rows


def gpu_tests(timeout_s: int) -> list[dict]:
  """`pytest -m gpu` under a time limit; one row with its outcome and the last summary line."""
  start = time.monotonic()
  try:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], capture_output=True,
                          text=True, timeout=timeout_s)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    outcome = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
    if done.returncode != 0:
      print(done.stdout[-6000:], done.stderr[-3000:], sep="\n", flush=True)
  except subprocess.TimeoutExpired as err:
    summary, outcome = f"stopped after {timeout_s} s", "TIMED OUT"
    print((err.stdout or b"")[-6000:], flush=True)
  return [{"suite": "tests", "case": "pytest -m gpu", "impl": outcome, "median_ms": "",
           "note": f"{summary} ({time.monotonic() - start:.0f} s)"}]


def fp8_suite(repeats: int) -> list[dict]:
  rows = []
  for implementation in ("mosaic_gpu", "xla"):
    rows += bench_fp8.run("deepgemm", implementation, repeats)
  return rows


def mla_suite(repeats: int) -> list[dict]:
  rows = []
  for implementation in ("mosaic_gpu", "xla"):
    rows += bench_mla.run("flashmla", implementation, repeats)
  return rows


def ep_suite(repeats: int) -> list[dict]:
  """DeepEP's shapes over this host's GPUs (one GPU: no communication, the local work only)."""
  return bench_ep.run("deepep", repeats)


def train_suite(repeats: int) -> list[dict]:
  """The demo model's training step at seq_len 512 (cases needing more GPUs than the host has are listed as skipped)."""
  return bench_pipeline.run(steps=repeats, seq_len=512)


SUITES = {"fp8": fp8_suite, "mla": mla_suite, "ep": ep_suite, "train": train_suite}

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("suites", list(SUITES), f"Kernel suites to time, of {sorted(SUITES)}.")
  flags.DEFINE_integer("tests_timeout_s", 240, "Time limit of the GPU tests.")
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (after 2 warm-up calls).")
  flags.DEFINE_bool("skip_tests", False, "Only measure.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = set(FLAGS.suites) - set(SUITES)
  if unknown:
    raise app.UsageError(f"unknown suites {sorted(unknown)}; choose from {sorted(SUITES)}")
  if jax.default_backend() != "gpu":
    print(f"benchmarks.gpu needs a GPU; jax sees {jax.devices()}", file=sys.stderr)
    return 2
  rows = ceilings(FLAGS.repeats)
  print(format_table(rows, ["suite", "case", "median_ms", "gb_s", "tflops"]), flush=True)
  if not FLAGS.skip_tests:
    rows += gpu_tests(FLAGS.tests_timeout_s)
    print(rows[-1], flush=True)
  for name in FLAGS.suites:
    suite_rows = SUITES[name](FLAGS.repeats)
    append_results(name, suite_rows, command="python -m benchmarks.gpu")
    rows += suite_rows
  columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("suite", "case")))
  print(format_table(rows, ["suite", "case", *columns]))
  if os.environ.get("OUT"):
    path = pathlib.Path(os.environ["OUT"]) / "gpu_suite.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
