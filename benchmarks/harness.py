"""A small timing harness: warm-up, block_until_ready, median and spread, JSON-lines results."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of `repeats` calls after `warmup` untimed ones."""

  median_s: float
  min_s: float
  max_s: float
  iqr_s: float  # interquartile range: the spread that ignores one-off hiccups
  repeats: int
  warmup: int


def _block(result: Any) -> Any:
  """Waits for jax results (any pytree); numpy and Python values pass through."""
  if "jax" in sys.modules:
    import jax

    return jax.block_until_ready(result)
  return result


def time_fn(fn: Callable[..., Any], *args, warmup: int = 2, repeats: int = 10, **kwargs) -> Timing:
  """Times `fn(*args, **kwargs)`, blocking on its outputs so device work is counted."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
  for _ in range(warmup):
    _block(fn(*args, **kwargs))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    _block(fn(*args, **kwargs))
    samples.append(time.perf_counter() - start)
  quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
  return Timing(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples),
                iqr_s=quartiles[2] - quartiles[0], repeats=repeats, warmup=warmup)


def machine() -> dict[str, Any]:
  """Where a figure was measured: CPU model and cores, Python, numpy, and jax with its devices."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
  import numpy

  info["numpy"] = numpy.__version__
  if "jax" in sys.modules:
    import jax

    info["jax"] = jax.__version__
    info["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  return info


def append_results(name: str, records: list[dict[str, Any]], *, command: str,
                   path: pathlib.Path | None = None) -> pathlib.Path:
  """Appends records as JSON lines, each stamped with date, machine and command."""
  path = path or RESULTS_DIR / f"{name}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "command": command}
  with open(path, "a") as f:
    for record in records:
      f.write(json.dumps(stamp | record) + "\n")
  return path


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """Plain-text table of `rows` (dicts) with the given columns."""
  cells = [[str(row.get(col, "")) for col in columns] for row in rows]
  widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
  lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
  return "\n".join(lines)
