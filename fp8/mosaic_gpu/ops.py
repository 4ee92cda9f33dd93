"""The `"mosaic_gpu"` implementation of the four GEMMs: tile lists for the one Hopper kernel.

Each wrapper lays the operands out as the kernel reads them (K-major fp8, A's scales MN-major,
B's block scales expanded per column), pads rows to whole tiles, builds the list of output
tiles (skipping -1 blocks of the contiguous layout, masked-out tiles, and empty k groups) and
picks a `Config`. Arguments arrive checked by `fp8.validation`; `fp8.api` then zeros padding
and masked-out rows (which the kernel leaves unwritten) and poisons broken traced layouts.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp

from backends import mosaic_interpret
from backends.sm90 import require_sm90
from fp8.mosaic_gpu import config as configs
from fp8.mosaic_gpu.kernel import expand_block_scales, promoted_gemm

_target = threading.local()


@contextlib.contextmanager
def compile_for(device_kind: str = "NVIDIA H200", num_sms: int = configs.DEFAULT_NUM_SMS):
  """Builds the kernels for this sm90 device instead of the local one, inside the block: for
  lowering ahead of time on a host without the GPU, e.g.
  `jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`."""
  previous = getattr(_target, "device", None)
  _target.device = (device_kind, num_sms)
  try:
    yield
  finally:
    _target.device = previous


def _device(interpret: bool) -> tuple[str | None, int]:
  """(device kind, SM count) of the GPU the kernel compiles for; refuses anything but sm90."""
  if interpret:
    return None, configs.INTERPRET_NUM_SMS
  if getattr(_target, "device", None) is not None:
    return _target.device
  device = require_sm90("the mosaic_gpu FP8 kernels")
  return device.device_kind, getattr(device, "core_count", configs.DEFAULT_NUM_SMS)


def _pad_rows(x: jax.Array, rows: int, axis: int = 0) -> jax.Array:
  if x.shape[axis] == rows:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rows - x.shape[axis])
  return jnp.pad(x, pad)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _full_k_tiles(row_starts: jax.Array, groups: jax.Array, k_blocks: int) -> jax.Array:
  """Tile rows for tiles that sum all of k: `(row, row, group, 0, k_blocks)`."""
  return jnp.stack([row_starts, row_starts, groups, jnp.zeros_like(row_starts),
                    jnp.full_like(row_starts, k_blocks)], axis=1).astype(jnp.int32)


def _compact(tiles: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The kept rows first (in order), and their count as `[1]` int32."""
  order = jnp.argsort(~keep, stable=True)
  return tiles[order], jnp.sum(keep, dtype=jnp.int32)[None]


def gemm_nt(a, b, *, c=None, out_dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
  """`d = c + a @ b.T`; see `fp8.gemm_nt`."""
  (a_fp8, sa), (b_fp8, sb) = a, b
  (m, k), n = a_fp8.shape, b_fp8.shape[0]
  if m == 0 or k == 0:
    return (jnp.zeros((m, n), jnp.float32) if c is None else c).astype(out_dtype)
  kind, num_sms = _device(interpret)
  out_bytes = jnp.dtype(out_dtype).itemsize
  cfg = configs.choose("gemm_nt", m, n, k, device_kind=kind, out_bytes=out_bytes, num_sms=num_sms)
  rows = _round_up(m, cfg.block_m)
  starts = jnp.arange(0, rows, cfg.block_m, dtype=jnp.int32)
  tiles = _full_k_tiles(starts, jnp.zeros_like(starts), k // configs.BLOCK_K)
  out = promoted_gemm(_pad_rows(a_fp8, rows), _pad_rows(sa, rows).T, b_fp8[None], expand_block_scales(sb, n)[None],
                      tiles, jnp.array([tiles.shape[0]], jnp.int32), None if c is None else _pad_rows(c, rows),
                      out_rows=rows, out_dtype=out_dtype, config=cfg, k_blocks=k // configs.BLOCK_K,
                      interpret=interpret, detect_races=mosaic_interpret.DETECT_RACES)
  return out[:m]


def m_grouped_gemm_nt_contiguous(a, b, m_indices, *, out_dtype=jnp.bfloat16, interpret: bool = False) -> jax.Array:
  """Grouped GEMM over 128-row blocks, each read as its first row's group; see `fp8.m_grouped_gemm_nt_contiguous`."""
  (a_fp8, sa), (b_fp8, sb) = a, b
  (m_sum, k), (groups, n, _) = a_fp8.shape, b_fp8.shape
  if m_sum == 0 or k == 0:
    return jnp.zeros((m_sum, n), out_dtype)
  kind, num_sms = _device(interpret)
  cfg = configs.choose("m_grouped_gemm_nt_contiguous", m_sum // groups, n, k, device_kind=kind, num_groups=groups,
                       out_bytes=jnp.dtype(out_dtype).itemsize, contiguous=True, num_sms=num_sms)
  starts = jnp.arange(0, m_sum, cfg.block_m, dtype=jnp.int32)
  block_group = m_indices[starts]  # DeepGEMM reads the group at tile granularity
  tiles, count = _compact(_full_k_tiles(starts, jnp.clip(block_group, 0, groups - 1), k // configs.BLOCK_K),
                          (block_group >= 0) & (block_group < groups))
  return promoted_gemm(a_fp8, sa.T, b_fp8, expand_block_scales(sb, n), tiles, count, None, out_rows=m_sum,
                       out_dtype=out_dtype, config=cfg, k_blocks=k // configs.BLOCK_K, interpret=interpret, detect_races=mosaic_interpret.DETECT_RACES)


def m_grouped_gemm_nt_masked(a, b, masked_m, expected_m: int, *, out_dtype=jnp.bfloat16,
                             interpret: bool = False) -> jax.Array:
  """Grouped GEMM over the first `masked_m[g]` rows of each group; see `fp8.m_grouped_gemm_nt_masked`."""
  (a_fp8, sa), (b_fp8, sb) = a, b
  (groups, m_max, k), n = a_fp8.shape, b_fp8.shape[1]
  if m_max == 0 or k == 0:
    return jnp.zeros((groups, m_max, n), out_dtype)
  kind, num_sms = _device(interpret)
  cfg = configs.choose("m_grouped_gemm_nt_masked", expected_m, n, k, device_kind=kind, num_groups=groups,
                       out_bytes=jnp.dtype(out_dtype).itemsize, num_sms=num_sms)
  rows = _round_up(m_max, cfg.block_m)  # each group's rows padded to whole tiles
  a_rows = _pad_rows(a_fp8, rows, axis=1).reshape(groups * rows, k)
  sa_rows = _pad_rows(sa, rows, axis=1).reshape(groups * rows, -1)
  per_group = rows // cfg.block_m
  group = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), per_group)
  within = jnp.tile(jnp.arange(per_group, dtype=jnp.int32) * cfg.block_m, groups)
  valid_rows = jnp.clip(masked_m, 0, m_max)[group]
  tiles, count = _compact(_full_k_tiles(group * rows + within, group, k // configs.BLOCK_K), within < valid_rows)
  out = promoted_gemm(a_rows, sa_rows.T, b_fp8, expand_block_scales(sb, n), tiles, count, None,
                      out_rows=groups * rows, out_dtype=out_dtype, config=cfg, k_blocks=k // configs.BLOCK_K,
                      interpret=interpret, detect_races=mosaic_interpret.DETECT_RACES)
  return out.reshape(groups, rows, n)[:, :m_max]


def k_grouped_gemm_tn_contiguous(a, b, ks, *, c=None, interpret: bool = False) -> jax.Array:
  """Per group, `c[g] + a_g.T @ b_g` in f32 (weight gradients); see `fp8.k_grouped_gemm_tn_contiguous`.

  The kernel wants K-major operands, so a `[sum_k, m]` and b `[sum_k, n]` are transposed first
  (one pass over each); their 128x1 scales `[sum_k/128, m|n]` are already what it reads.
  """
  (a_fp8, sa), (b_fp8, sb) = a, b
  (sum_k, m), n = a_fp8.shape, b_fp8.shape[1]
  groups = ks.shape[0]
  zeros = jnp.zeros((groups, m, n), jnp.float32) if c is None else c.astype(jnp.float32)
  if m == 0 or sum_k == 0:
    return zeros
  kind, num_sms = _device(interpret)
  total_blocks = sum_k // configs.BLOCK_K
  cfg = configs.choose("k_grouped_gemm_tn_contiguous", m, n, sum_k // max(groups, 1), device_kind=kind,
                       num_groups=groups, out_bytes=4, num_sms=num_sms)
  rows = _round_up(m, cfg.block_m)
  blocks = jnp.maximum(ks, 0) // configs.BLOCK_K
  first = jnp.cumsum(blocks) - blocks
  blocks = jnp.clip(jnp.minimum(blocks, total_blocks - first), 0)  # broken traced ks: never read past k
  per_group = rows // cfg.block_m
  group = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), per_group)
  within = jnp.tile(jnp.arange(per_group, dtype=jnp.int32) * cfg.block_m, groups)
  tiles = jnp.stack([within, group * rows + within, jnp.zeros_like(group), first[group], blocks[group]],
                    axis=1).astype(jnp.int32)
  tiles, count = _compact(tiles, blocks[group] > 0)
  c_rows = None if c is None else _pad_rows(c.astype(jnp.float32), rows, axis=1).reshape(groups * rows, n)
  out = promoted_gemm(_pad_rows(a_fp8.T, rows), _pad_rows(sa, rows, axis=1), b_fp8.T[None], sb[None], tiles, count,
                      c_rows, out_rows=groups * rows, out_dtype=jnp.float32, config=cfg, k_blocks=None,
                      interpret=interpret, detect_races=mosaic_interpret.DETECT_RACES)
  out = out.reshape(groups, rows, n)[:, :m]
  return jnp.where((blocks > 0)[:, None, None], out, zeros)  # empty groups: no tile wrote them
