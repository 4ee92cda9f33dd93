"""Mosaic GPU interpret mode for every kernel package: the one place that imports its (not yet public) parameters class.

In JAX 0.10.x `InterpretGPUParams` lives under `jax._src`; when a later JAX exports it, only the
import below changes. Interpret mode runs a kernel's exact code on any backend (CPU included),
simulating shared memory, barriers, TMA and wgmma, and can detect races.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

# Race detection for every interpreted kernel (tests switch it on; it slows the interpreter).
DETECT_RACES = False

# The interpreter runs each warpgroup as a blocking host computation. Measured on a 2-core host
# (JAX 0.10.2): a kernel with 3 warpgroups deadlocks with 1 or 2 CPU devices and runs with 4.
_MIN_HOST_THREADS = 4
_FIX = "XLA_FLAGS=--xla_force_host_platform_device_count=8"


@functools.cache
def _warn_if_the_host_may_deadlock() -> None:
  try:
    cpus = len(jax.devices("cpu"))
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS=cuda): nothing to say
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  if max(cores, cpus) < _MIN_HOST_THREADS:
    warnings.warn(f"Mosaic GPU interpret mode with {cores} cores and {cpus} CPU devices can deadlock "
                  f"(warpgroups wait on each other for host threads); set {_FIX} before importing jax",
                  RuntimeWarning, stacklevel=2)


def params(interpret: bool, *, detect_races: bool = False):
  """What `plgpu.kernel(interpret=...)` takes: None to compile for the GPU, else interpreter params."""
  if not interpret:
    return None
  _warn_if_the_host_may_deadlock()
  return InterpretGPUParams(detect_races=detect_races, out_of_bounds_reads="raise", uninitialized_memory="nan")
