"""Block sizes of the Hopper FP8 kernels: a frozen `Config` from a pure heuristic, as DeepGEMM's.

DeepGEMM does not autotune. `block_m` is 64 for small M and 128 otherwise (always 128 for the
contiguous layout, whose groups are 128-row aligned); `block_n` minimises the number of waves
of output tiles over the SMs, then maximises the use of the last wave; the stage count is as
many k blocks as fit in shared memory. `TUNED` may override the heuristic per device kind once a
configuration has been measured to beat it.
"""

from __future__ import annotations

import dataclasses
import math

BLOCK_K = 128  # one scale block of k per pipeline step: promotion happens after each
SMEM_BYTES = 232448  # per CTA on sm90 (227 KiB)
MAX_STAGES = 8
ROWS_PER_WARPGROUP = 64  # one wgmma M; each compute warpgroup owns 64 rows of the tile
BLOCK_N_CHOICES = (64, 128)  # larger tiles would need the f32 accumulator and its partial in >255 registers
DEFAULT_NUM_SMS = 132  # H100 / H200 / H800
# The device simulated in interpret mode: a few SMs, so each CTA of the persistent grid walks
# several tiles (the path a real GPU takes on large problems) and the interpreter, which pays
# per tile, stays fast.
INTERPRET_NUM_SMS = 4


@dataclasses.dataclass(frozen=True)
class Config:
  """One kernel's tiling.

  Attributes:
    block_m: rows per output tile (64 or 128); `block_m // 64` compute warpgroups.
    block_n: columns per output tile (64 or 128).
    stages: k blocks in flight in the shared-memory ring.
    num_sms: CTAs of the persistent grid.
    grid_tile_width: tiles per band of the L2-friendly snake order over (m, n) tiles.
  """
  block_m: int
  block_n: int
  stages: int
  num_sms: int = DEFAULT_NUM_SMS
  grid_tile_width: int = 8

  def __post_init__(self):
    if self.block_m not in (64, 128):
      raise ValueError(f"block_m must be 64 or 128, got {self.block_m}")
    if self.block_n not in BLOCK_N_CHOICES:
      raise ValueError(f"block_n must be one of {BLOCK_N_CHOICES}, got {self.block_n}")
    if not 1 <= self.stages <= MAX_STAGES:
      raise ValueError(f"stages must be in [1, {MAX_STAGES}], got {self.stages}")
    if self.num_sms < 1 or self.grid_tile_width < 1:
      raise ValueError(f"num_sms and grid_tile_width must be positive, got {self.num_sms}, {self.grid_tile_width}")

  @property
  def compute_warpgroups(self) -> int:
    return self.block_m // ROWS_PER_WARPGROUP


def stage_bytes(block_m: int, block_n: int) -> int:
  """Shared memory per pipeline stage: fp8 A and B tiles and their f32 scale vectors."""
  return (block_m + block_n) * BLOCK_K + (block_m + block_n) * 4


def epilogue_bytes(block_m: int, block_n: int, out_bytes: int) -> int:
  return block_m * block_n * out_bytes


def max_stages(block_m: int, block_n: int, out_bytes: int, smem_bytes: int = SMEM_BYTES) -> int:
  """As many stages as fit beside the epilogue tile (and 1 KiB for barriers), at most MAX_STAGES."""
  free = smem_bytes - epilogue_bytes(block_m, block_n, out_bytes) - 1024
  return max(1, min(MAX_STAGES, free // stage_bytes(block_m, block_n)))


def heuristic(m: int, n: int, *, num_groups: int = 1, out_bytes: int = 2, contiguous: bool = False,
              num_sms: int = DEFAULT_NUM_SMS, smem_bytes: int = SMEM_BYTES) -> Config:
  """DeepGEMM's choice for `num_groups` GEMMs of about `m` rows by `n` columns each.

  Args:
    m: rows per group (for the masked layout, the expected rows).
    n: output columns, a multiple of 64.
    num_groups: independent GEMMs sharing the grid (m-grouped or k-grouped).
    out_bytes: bytes per output element (2 for bf16, 4 for f32).
    contiguous: the m-grouped contiguous layout (128-row blocks).
    num_sms: the SM count of the device.
    smem_bytes: shared memory per CTA.
  """
  if n <= 0 or n % 64:
    raise ValueError(f"n must be a positive multiple of 64, got {n}")
  block_m = 128 if contiguous or m > 64 else 64
  best = None
  for block_n in BLOCK_N_CHOICES:
    if n % block_n:
      continue
    tiles = num_groups * math.ceil(max(m, 1) / block_m) * (n // block_n)
    waves = math.ceil(tiles / num_sms)
    last_wave_use = tiles - (waves - 1) * num_sms
    key = (waves, -last_wave_use, -block_n)  # fewer waves, a fuller last wave, then bigger tiles
    if best is None or key < best[0]:
      best = (key, block_n)
  block_n = best[1]
  return Config(block_m, block_n, max_stages(block_m, block_n, out_bytes, smem_bytes), num_sms=num_sms)


# Measured overrides: device kind -> {(kernel, m, n, k): Config}. Empty until a lent GPU has
# timed a configuration that beats the heuristic (benchmarks/bench_fp8.py records both).
TUNED: dict[str, dict[tuple[str, int, int, int], Config]] = {}


def choose(kernel: str, m: int, n: int, k: int, *, device_kind: str | None, **heuristic_args) -> Config:
  """`TUNED[device_kind][(kernel, m, n, k)]` if measured, else `heuristic(m, n, ...)`.

  Raises:
    ValueError: a tuned entry that cannot tile this problem (it would leave columns unwritten).
  """
  tuned = TUNED.get(device_kind or "", {}).get((kernel, m, n, k))
  if tuned is None:
    return heuristic(m, n, **heuristic_args)
  if n % tuned.block_n or (heuristic_args.get("contiguous") and tuned.block_m != 128):
    raise ValueError(f"TUNED[{device_kind!r}][{(kernel, m, n, k)}] = {tuned} cannot tile n={n}"
                     f"{' in the 128-row contiguous layout' if heuristic_args.get('contiguous') else ''}")
  return tuned
