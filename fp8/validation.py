"""One checker per GEMM, run once before dispatch: every caller error is a ValueError naming the argument.

Shapes and dtypes are always checked. Group metadata (`m_indices`, `masked_m`, `ks`) is
checked when it is concrete; under jit it is traced, and the implementations instead make a
broken layout loud by writing NaN where it would have read the wrong data.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fp8.formats import BLOCK, FP8_DTYPE
from fp8.layout import M_ALIGNMENT

N_ALIGNMENT = 64  # DeepGEMM's kernels need n % 64 == 0
OUT_DTYPES = (jnp.bfloat16, jnp.float32)


class GemmDims(NamedTuple):
  """Problem sizes of a checked GEMM (`num_groups` is 1 for `gemm_nt`)."""

  m: int
  n: int
  k: int
  num_groups: int


def _concrete(x) -> np.ndarray | None:
  """`x` as numpy when its values are known now, None when it is traced under jit."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _operand(name: str, pair, data_ndim: int) -> tuple[jax.Array, jax.Array]:
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    raise ValueError(f"{name} must be a pair ({name}_fp8, {name}_scale), got {type(pair).__name__}")
  try:
    data, scale = (jnp.asarray(p) if not isinstance(p, jax.Array) else p for p in pair)
  except TypeError as err:
    raise ValueError(f"{name} must hold two arrays ({name}_fp8, {name}_scale): {err}") from None
  if data.dtype != FP8_DTYPE:
    raise ValueError(f"{name}[0] must be float8_e4m3fn (see fp8.quantize_per_token), got {data.dtype}")
  if scale.dtype != jnp.float32:
    raise ValueError(f"{name}[1] (the scales) must be float32, got {scale.dtype}")
  if data.ndim != data_ndim:
    raise ValueError(f"{name}[0] must be {data_ndim}-D, got shape {data.shape}")
  return data, scale


def _expect_shape(name: str, array: jax.Array, expected: tuple[int, ...], what: str) -> None:
  if tuple(array.shape) != expected:
    raise ValueError(f"{name} must have shape {expected} ({what}), got {tuple(array.shape)}")


def _check_k(k: int) -> None:
  if k % BLOCK:
    raise ValueError(f"k={k} must be a multiple of {BLOCK}, the scaling block")


def _check_n(n: int) -> None:
  if n % N_ALIGNMENT:
    raise ValueError(f"n={n} must be a multiple of {N_ALIGNMENT}")


def check_out_dtype(out_dtype, has_c: bool):
  """Resolves `out_dtype`: bf16 by default, f32 when `c` is given (and then it must be f32)."""
  if out_dtype is None:
    return jnp.dtype(jnp.float32 if has_c else jnp.bfloat16)
  try:
    out_dtype = jnp.dtype(out_dtype)
  except TypeError:
    raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype!r}") from None
  if out_dtype not in OUT_DTYPES:
    raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
  if has_c and out_dtype != jnp.float32:
    raise ValueError(f"out_dtype must be float32 when c is given, got {out_dtype}")
  return out_dtype


def _check_c(c, expected: tuple[int, ...]) -> None:
  if c is None:
    return
  if not hasattr(c, "dtype") or c.dtype != jnp.float32:
    raise ValueError(f"c must be a float32 array, got {getattr(c, 'dtype', type(c).__name__)}")
  _expect_shape("c", c, expected, "the accumulator added to the product")


def _int_array(name: str, x, shape: tuple[int, ...] | None) -> jax.Array:
  """`x` as int32, checked for dtype and shape (None: 1-D, non-empty), and for int32 range while concrete."""
  if not isinstance(x, jax.Array):
    try:
      x = np.asarray(x)
    except (TypeError, ValueError, jax.errors.TracerArrayConversionError) as err:
      raise ValueError(f"{name} must be an int array or a list of ints (a traced list: pass an array), "
                       f"got {type(x).__name__}: {err}") from None
  if shape is None and (x.ndim != 1 or x.shape[0] < 1):
    raise ValueError(f"{name} must be a non-empty 1-D list or array of group sizes, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  if shape is not None:
    _expect_shape(name, x, shape, f"one entry per {'row' if name == 'm_indices' else 'group'}")
  values = _concrete(x)
  if values is not None and values.size and (values.min() < -2**31 or values.max() >= 2**31):
    raise ValueError(f"{name} holds values outside int32: min {values.min()}, max {values.max()}")
  return jnp.asarray(x, jnp.int32)


def check_gemm_nt(a, b, c, out_dtype) -> tuple[GemmDims, jnp.dtype]:
  """Checks `gemm_nt(a=(a_fp8 [m, k], sa [m, k/128]), b=(b_fp8 [n, k], sb [ceil(n/128), k/128]), c [m, n])`."""
  a_fp8, sa = _operand("a", a, 2)
  b_fp8, sb = _operand("b", b, 2)
  (m, k), (n, k_b) = a_fp8.shape, b_fp8.shape
  if k_b != k:
    raise ValueError(f"a and b must share k: a[0] is {a_fp8.shape}, b[0] is {b_fp8.shape}")
  _check_k(k)
  _check_n(n)
  _expect_shape("a[1]", sa, (m, k // BLOCK), "one scale per 1x128 tile")
  _expect_shape("b[1]", sb, (-(-n // BLOCK), k // BLOCK), "one scale per 128x128 tile")
  _check_c(c, (m, n))
  return GemmDims(m, n, k, 1), check_out_dtype(out_dtype, c is not None)


def _check_grouped_b(b, k_a: int, num_groups: int | None = None) -> tuple[int, int]:
  b_fp8, sb = _operand("b", b, 3)
  num_groups_b, n, k = b_fp8.shape
  if num_groups_b < 1:
    raise ValueError(f"b must hold at least one group, got b[0] of shape {b_fp8.shape}")
  if num_groups is not None and num_groups_b != num_groups:
    raise ValueError(f"b has {num_groups_b} groups but a has {num_groups}: b[0] is {b_fp8.shape}")
  if k != k_a:
    raise ValueError(f"a and b must share k: a has k={k_a}, b[0] is {b_fp8.shape}")
  _check_k(k)
  _check_n(n)
  _expect_shape("b[1]", sb, (num_groups_b, -(-n // BLOCK), k // BLOCK), "one scale per 128x128 tile per group")
  return num_groups_b, n


def check_m_grouped_contiguous(a, b, m_indices, out_dtype) -> tuple[GemmDims, jnp.dtype, jax.Array]:
  """Checks the contiguous layout: a `[m_sum, k]`, b `[G, n, k]`, m_indices `[m_sum]` (-1 = padding)."""
  a_fp8, sa = _operand("a", a, 2)
  m_sum, k = a_fp8.shape
  num_groups, n = _check_grouped_b(b, k)
  _expect_shape("a[1]", sa, (m_sum, k // BLOCK), "one scale per 1x128 tile")
  if m_sum % M_ALIGNMENT:
    raise ValueError(f"m_sum={m_sum} (rows of a) must be a multiple of {M_ALIGNMENT}; pad each group "
                     "with -1 rows (see fp8.contiguous_m_indices)")
  m_indices = _int_array("m_indices", m_indices, (m_sum,))
  values = _concrete(m_indices)
  if values is not None:
    _check_contiguous_values(values, num_groups)
  return GemmDims(m_sum, n, k, num_groups), check_out_dtype(out_dtype, False), m_indices


def _check_contiguous_values(values: np.ndarray, num_groups: int) -> None:
  bad = (values < -1) | (values >= num_groups)
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(f"m_indices[{row}]={values[row]} is out of range: groups are 0..{num_groups - 1}, -1 is padding")
  blocks = values.reshape(-1, M_ALIGNMENT)
  first = blocks[:, 0]
  is_padding = blocks == -1
  after_padding = np.maximum.accumulate(is_padding, axis=1)
  misplaced = ~is_padding & ((blocks != first[:, None]) | after_padding)
  if misplaced.any():
    block = int(np.argmax(misplaced.any(axis=1)))
    raise ValueError(f"m_indices rows {block * M_ALIGNMENT}..{(block + 1) * M_ALIGNMENT - 1} are not one group's "
                     f"rows followed by padding: each group must start on a multiple of {M_ALIGNMENT}, "
                     f"with its -1 padding after its last row")
  has_padding = is_padding.any(axis=1)
  gap = (first[1:] == first[:-1]) & (first[1:] >= 0) & has_padding[:-1]
  if gap.any():
    block = int(np.argmax(gap)) + 1
    raise ValueError(f"m_indices: group {first[block]} has -1 padding in the middle, before row {block * M_ALIGNMENT}")
  used = first[first >= 0]
  runs = used[np.concatenate([[True], used[1:] != used[:-1]])] if used.size else used
  if len(runs) != len(set(runs.tolist())):
    repeated = next(g for g in runs.tolist() if (runs == g).sum() > 1)
    raise ValueError(f"m_indices: group {repeated}'s rows are not contiguous")


def check_m_grouped_masked(a, b, masked_m, expected_m, out_dtype) -> tuple[GemmDims, jnp.dtype, jax.Array]:
  """Checks the masked layout: a `[G, m_max, k]`, b `[G, n, k]`, masked_m `[G]` in [0, m_max]."""
  a_fp8, sa = _operand("a", a, 3)
  num_groups, m_max, k = a_fp8.shape
  _, n = _check_grouped_b(b, k, num_groups)
  _expect_shape("a[1]", sa, (num_groups, m_max, k // BLOCK), "one scale per 1x128 tile")
  masked_m = _int_array("masked_m", masked_m, (num_groups,))
  if isinstance(expected_m, bool) or not isinstance(expected_m, numbers.Integral) or expected_m < 0:
    raise ValueError(f"expected_m must be a non-negative int (a static tiling hint), got {expected_m!r}")
  values = _concrete(masked_m)
  if values is not None:
    bad = (values < 0) | (values > m_max)
    if bad.any():
      group = int(np.argmax(bad))
      raise ValueError(f"masked_m[{group}]={values[group]} must be in [0, m_max={m_max}]")
  return GemmDims(m_max, n, k, num_groups), check_out_dtype(out_dtype, False), masked_m


def check_k_grouped(a, b, ks, c) -> tuple[GemmDims, jax.Array]:
  """Checks `k_grouped_gemm_tn_contiguous`: a `[sum_k, m]`, b `[sum_k, n]` with 128x1 scales, ks `[G]`."""
  a_fp8, sa = _operand("a", a, 2)
  b_fp8, sb = _operand("b", b, 2)
  (sum_k, m), (sum_k_b, n) = a_fp8.shape, b_fp8.shape
  if sum_k_b != sum_k:
    raise ValueError(f"a and b must share their k rows: a[0] is {a_fp8.shape}, b[0] is {b_fp8.shape}")
  if sum_k % BLOCK:
    raise ValueError(f"the k rows of a and b ({sum_k}) must be a multiple of {BLOCK}")
  _check_n(n)
  _expect_shape("a[1]", sa, (sum_k // BLOCK, m), "one scale per 128x1 tile: fp8.quantize_per_channel")
  _expect_shape("b[1]", sb, (sum_k // BLOCK, n), "one scale per 128x1 tile: fp8.quantize_per_channel")
  ks_array = _int_array("ks", ks, None)
  num_groups = ks_array.shape[0]
  values = _concrete(ks_array)
  if values is not None:
    bad = (values < 0) | (values % BLOCK != 0)
    if bad.any():
      group = int(np.argmax(bad))
      raise ValueError(f"ks[{group}]={values[group]} must be a non-negative multiple of {BLOCK}")
    if values.sum() > sum_k:
      raise ValueError(f"sum(ks)={values.sum()} exceeds the {sum_k} k rows of a and b")
  _check_c(c, (num_groups, m, n))
  return GemmDims(m, n, sum_k, num_groups), ks_array
