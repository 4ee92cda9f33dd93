"""A local storage cluster for benchmarks: `python -m storage cluster`, every service its own process."""

from __future__ import annotations

import pathlib
import subprocess
import sys


def start_cluster(root: pathlib.Path, *, chunk_bytes: int = 1 << 20) -> tuple[subprocess.Popen, str]:
  """Starts 3 nodes with 3 replicas under `root`; returns the process and mgmtd's `HOST:PORT`.

  Stop it with `proc.send_signal(signal.SIGINT)` (or terminate) and `proc.wait()`.
  """
  proc = subprocess.Popen([sys.executable, "-m", "storage", "cluster", "--nodes", "3", "--replicas", "3",
                           "--data-dir", str(root), "--chunk-size", str(chunk_bytes)], stdout=subprocess.PIPE,
                          text=True)
  line = proc.stdout.readline()
  if "cluster ready" not in line:
    proc.kill()
    raise RuntimeError(f"cluster did not start: {line!r}")
  return proc, line.split()[-1]
