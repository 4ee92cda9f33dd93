"""Random FP8 GEMM problems and their float64 references, shared by every implementation's tests.

Each maker returns the quantized operands plus two references:
- `ref`: the f32 product of the unquantized inputs (judged with calc_diff < 1e-3, DeepGEMM's bar);
- `exact`: a float64 product of the dequantized inputs (the kernel must match it to ~1e-6).
Rows that must not be read (padding, masked-out rows, rows past sum(ks)) hold NaN in the fp8
operands, so a kernel that reads them shows it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8
from fp8.api import IMPLEMENTATIONS, INTERPRETABLE, PLATFORMS

NAN_FP8 = jnp.array(jnp.nan, jnp.float8_e4m3fn)


def implementations(*ops: str) -> list:
  """pytest params: the backends every op in `ops` has. One that runs neither on CPU nor in
  Mosaic GPU interpret mode is marked gpu."""
  names = sorted(set.intersection(*(set(IMPLEMENTATIONS[op]) for op in ops)))
  return [pytest.param(name, marks=() if _runs_here(name) or name in INTERPRETABLE else pytest.mark.gpu)
          for name in names]


def _runs_here(name: str) -> bool:
  return jax.default_backend() in PLATFORMS.get(name, ())


def interpreted(name: str) -> bool:
  """Whether the suite runs backend `name` in Mosaic GPU interpret mode here (no native platform)."""
  return not _runs_here(name) and name in INTERPRETABLE


def backend(name: str) -> dict:
  """Keyword arguments that run backend `name` here: natively, or in interpret mode."""
  return {"implementation": name, "interpret": interpreted(name)}


def skip_if_too_big_to_interpret(name: str, output_elements: int, limit: int = 135_000) -> None:
  """The interpreter pays about a second per output tile: larger cases run natively on a GPU only."""
  if interpreted(name) and output_elements > limit:
    pytest.skip(f"{output_elements} output elements is too many for interpret mode; runs natively on a GPU")


class Problem(NamedTuple):
  args: tuple  # positional arguments of the GEMM
  kwargs: dict
  ref: np.ndarray  # float64, from the unquantized inputs
  exact: np.ndarray  # float64, from the dequantized inputs


def normal(seed: int, shape, dtype=jnp.bfloat16) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def dequantized(pair) -> np.ndarray:
  return f64(fp8.dequantize(*pair))


def gemm_nt_problem(seed: int, m: int, n: int, k: int, *, with_c: bool = False, ue8m0: bool = False) -> Problem:
  x, w = normal(seed, (m, k)), normal(seed + 1, (n, k))
  a = fp8.quantize_per_token(x, ue8m0=ue8m0)
  b = fp8.quantize_per_block(w, ue8m0=ue8m0)
  c = normal(seed + 2, (m, n), jnp.float32) if with_c else None
  ref = f64(x) @ f64(w).T
  exact = dequantized(a) @ dequantized(b).T
  if with_c:
    ref, exact = ref + f64(c), exact + f64(c)
  return Problem((a, b), {"c": c}, ref, exact)


def contiguous_problem(seed: int, group_sizes, n: int, k: int, *, m_sum: int | None = None,
                       ue8m0: bool = False) -> Problem:
  """Groups of the given sizes in DeepGEMM's contiguous layout; padding rows are NaN in a."""
  aligned = sum(-(-size // 128) * 128 for size in group_sizes)
  m_sum = aligned if m_sum is None else m_sum
  m_indices, _ = fp8.contiguous_m_indices(jnp.array(group_sizes), m_sum)
  rows = np.asarray(m_indices)
  x = normal(seed, (m_sum, k))
  w = normal(seed + 1, (len(group_sizes), n, k))
  a_fp8, sa = fp8.quantize_per_token(x, ue8m0=ue8m0)
  a_fp8 = jnp.where(jnp.asarray(rows >= 0)[:, None], a_fp8, NAN_FP8)
  b = fp8.quantize_per_block(w, ue8m0=ue8m0)
  ref, exact = np.zeros((m_sum, n)), np.zeros((m_sum, n))
  x64, w64, a64, b64 = f64(x), f64(w), dequantized((a_fp8, sa)), dequantized(b)
  for group in range(len(group_sizes)):
    sel = rows == group
    ref[sel] = x64[sel] @ w64[group].T
    exact[sel] = a64[sel] @ b64[group].T
  return Problem(((a_fp8, sa), b, m_indices), {}, ref, exact)


def masked_problem(seed: int, masked_m, m_max: int, n: int, k: int, *, ue8m0: bool = False) -> Problem:
  """Groups of `m_max` rows of which the first `masked_m[g]` count; the rest are NaN in a."""
  groups = len(masked_m)
  x, w = normal(seed, (groups, m_max, k)), normal(seed + 1, (groups, n, k))
  valid = np.arange(m_max)[None, :] < np.asarray(masked_m)[:, None]
  a_fp8, sa = fp8.quantize_per_token(x, ue8m0=ue8m0)
  a_fp8 = jnp.where(jnp.asarray(valid)[..., None], a_fp8, NAN_FP8)
  b = fp8.quantize_per_block(w, ue8m0=ue8m0)
  ref = np.einsum("gmk,gnk->gmn", f64(x), f64(w)) * valid[..., None]
  exact = np.nan_to_num(np.einsum("gmk,gnk->gmn", dequantized((a_fp8, sa)), dequantized(b))) * valid[..., None]
  expected_m = int(np.mean(masked_m)) + 1
  return Problem(((a_fp8, sa), b, jnp.array(masked_m, jnp.int32), expected_m), {}, ref, exact)


def k_grouped_problem(seed: int, ks, m: int, n: int, *, sum_k: int | None = None, with_c: bool = False,
                      ue8m0: bool = False) -> Problem:
  """Groups of `ks[g]` rows of k; rows past sum(ks) are NaN in both operands."""
  total = sum(ks)
  sum_k = total if sum_k is None else sum_k
  x, y = normal(seed, (sum_k, m)), normal(seed + 1, (sum_k, n))
  a_fp8, sa = fp8.quantize_per_channel(x, ue8m0=ue8m0)
  b_fp8, sb = fp8.quantize_per_channel(y, ue8m0=ue8m0)
  tail = jnp.arange(sum_k)[:, None] >= total
  a_fp8, b_fp8 = jnp.where(tail, NAN_FP8, a_fp8), jnp.where(tail, NAN_FP8, b_fp8)
  c = normal(seed + 2, (len(ks), m, n), jnp.float32) if with_c else None
  x64, y64 = f64(x), f64(y)
  a64, b64 = dequantized((a_fp8, sa)), dequantized((b_fp8, sb))
  starts = np.concatenate([[0], np.cumsum(ks)])
  ref = np.stack([x64[s:e].T @ y64[s:e] for s, e in zip(starts[:-1], starts[1:])])
  exact = np.stack([a64[s:e].T @ b64[s:e] for s, e in zip(starts[:-1], starts[1:])])
  if with_c:
    ref, exact = ref + f64(c), exact + f64(c)
  return Problem(((a_fp8, sa), (b_fp8, sb), list(ks)), {"c": c}, ref, exact)
