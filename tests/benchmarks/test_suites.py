"""Every benchmark suite can be imported together (`python -m benchmarks`) and run alone (`--help`)."""

import subprocess
import sys

import pytest


def test_all_suites_import_together():
  from benchmarks.__main__ import SUITES
  assert set(SUITES) == {"balancer", "fp8", "mla", "ffi", "ep", "storage", "checkpoint", "pipeline", "graysort",
                         "kvcache", "sharded_checkpoint", "serve"}


@pytest.mark.parametrize("suite", ["bench_balancer", "bench_fp8", "bench_mla", "bench_ffi", "bench_ep",
                                   "bench_storage", "bench_checkpoint", "bench_pipeline", "bench_graysort",
                                   "bench_kvcache", "bench_sharded_checkpoint", "serve_load"])
def test_each_suite_is_a_program(suite):
  result = subprocess.run([sys.executable, "-m", f"benchmarks.{suite}", "--helpshort"], capture_output=True,
                          text=True, timeout=120)
  # absl exits 1 after printing help; what matters is that the flags were defined and printed.
  assert "flags:" in result.stdout and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_the_gpu_suite_is_a_program_that_refuses_a_cpu_host():
  help_run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--helpshort"], capture_output=True, text=True,
                            timeout=120)
  assert "--suites" in help_run.stdout and "Traceback" not in help_run.stderr, help_run.stderr[-2000:]
  from benchmarks import gpu
  assert set(gpu.SUITES) == {"fp8", "mla", "ep", "train"}
  import jax
  if jax.default_backend() == "gpu":
    return
  run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--skip_tests"], capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 2 and "needs a GPU" in run.stderr
