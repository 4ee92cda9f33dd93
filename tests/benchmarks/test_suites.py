"""Every benchmark suite can be imported together (`python -m benchmarks`) and run alone (`--help`)."""

import subprocess
import sys

import pytest


def test_all_suites_import_together():
  from benchmarks.__main__ import SUITES
  assert set(SUITES) == {"balancer", "fp8", "mla", "ffi", "storage"}


@pytest.mark.parametrize("suite", ["bench_balancer", "bench_fp8", "bench_mla", "bench_ffi", "bench_storage"])
def test_each_suite_is_a_program(suite):
  result = subprocess.run([sys.executable, "-m", f"benchmarks.{suite}", "--helpshort"], capture_output=True,
                          text=True, timeout=120)
  # absl exits 1 after printing help; what matters is that the flags were defined and printed.
  assert "flags:" in result.stdout and "Traceback" not in result.stderr, result.stderr[-2000:]
