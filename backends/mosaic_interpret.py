"""Mosaic GPU interpret mode for every kernel package: the one place that imports its (not yet public) parameters class.

In JAX 0.10.x `InterpretGPUParams` lives under `jax._src`; when a later JAX exports it, only the
import below changes. Interpret mode runs a kernel's exact code on any backend (CPU included),
simulating shared memory, barriers, TMA and wgmma, and can detect races.
"""

from __future__ import annotations

from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

# Race detection for every interpreted kernel (tests switch it on; it slows the interpreter).
DETECT_RACES = False


def params(interpret: bool, *, detect_races: bool = False):
  """What `plgpu.kernel(interpret=...)` takes: None to compile for the GPU, else interpreter params."""
  if not interpret:
    return None
  return InterpretGPUParams(detect_races=detect_races, out_of_bounds_reads="raise", uninitialized_memory="nan")
