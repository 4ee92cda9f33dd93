"""DeepGEMM's four FP8 GEMMs: one public function each, with `implementation=`.

All compute `D = C + A @ B.T` (the k-grouped one `A.T @ B`) from e4m3 operands with
fine-grained f32 scales, accumulating in f32 and promoting per 128-wide k block.

`implementation` names a backend: `"xla"` (pure jnp, everywhere) or `"mosaic_gpu"` (the Hopper
kernels of `fp8.mosaic_gpu`, sm90 only). `None` tries the backends preferred on the current
platform in order (mosaic_gpu, then xla, on a GPU) and falls through on `NotImplementedError`.
`interpret=True` runs a kernel backend's exact code in Mosaic GPU interpret mode on any backend,
CPU included (slow: for tests, and for anyone without a GPU).

Arguments are checked once, here, before any backend sees them. The grouped layouts' row
semantics are also applied here, once for every backend, in one elementwise pass over the
output: padding and masked-out rows become exactly zero (a backend may leave them unwritten),
and rows whose traced metadata breaks the layout become NaN.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from backends import select_and_run
from fp8 import layout, mosaic_gpu, reference, validation
from fp8.formats import BLOCK

# Backends per op. A kernel module adds its entry here and to PLATFORMS; `_PREFERRED` orders them.
IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "gemm_nt": {"xla": reference.gemm_nt, "mosaic_gpu": mosaic_gpu.gemm_nt},
    "m_grouped_gemm_nt_contiguous": {"xla": reference.m_grouped_gemm_nt_contiguous,
                                     "mosaic_gpu": mosaic_gpu.m_grouped_gemm_nt_contiguous},
    "m_grouped_gemm_nt_masked": {"xla": reference.m_grouped_gemm_nt_masked,
                                 "mosaic_gpu": mosaic_gpu.m_grouped_gemm_nt_masked},
    "k_grouped_gemm_tn_contiguous": {"xla": reference.k_grouped_gemm_tn_contiguous,
                                     "mosaic_gpu": mosaic_gpu.k_grouped_gemm_tn_contiguous},
}
# Where each backend runs natively; INTERPRETABLE ones also run anywhere with interpret=True
# (the test suite runs them that way on CPU, and natively under the `gpu` marker).
PLATFORMS: dict[str, tuple[str, ...]] = {"xla": ("cpu", "gpu", "tpu"), "mosaic_gpu": ("gpu",)}
INTERPRETABLE = frozenset({"mosaic_gpu"})
_PREFERRED = {"gpu": ("mosaic_gpu", "xla")}


def _run(op: str, implementation: str | None, *args, **kwargs):
  return select_and_run(op, IMPLEMENTATIONS[op], implementation, _PREFERRED, *args, **kwargs)


def gemm_nt(a, b, *, c=None, out_dtype=None, implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """`d = c + a @ b.T` with 1x128-scaled activations and 128x128-scaled weights.

  Args:
    a: `(a_fp8 [m, k] float8_e4m3fn, sa [m, k/128] float32)`, from `quantize_per_token`.
    b: `(b_fp8 [n, k] float8_e4m3fn, sb [ceil(n/128), k/128] float32)`, from `quantize_per_block`.
      k must be a multiple of 128 and n of 64.
    c: optional `[m, n]` float32 added to the product; the output is then float32.
    out_dtype: bfloat16 (the default without c) or float32.
    implementation: a backend name, or None for the platform's best.
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `d [m, n]` of `out_dtype`.
  """
  _, out_dtype = validation.check_gemm_nt(a, b, c, out_dtype)
  return _run("gemm_nt", implementation, a, b, c=c, out_dtype=out_dtype, interpret=bool(interpret))


def m_grouped_gemm_nt_contiguous(a, b, m_indices, *, out_dtype=None, implementation: str | None = None,
                                 interpret: bool = False) -> jax.Array:
  """Grouped `d[r] = a[r] @ b[m_indices[r]].T` over DeepGEMM's contiguous layout (MoE prefill and training).

  Each group's rows are contiguous and start on a multiple of 128
  (`get_m_alignment_for_contiguous_layout()`); the rows padding a group up to the next
  multiple hold -1 in `m_indices`, and their output is zero; whole blocks of -1 are allowed
  anywhere (a capacity-sized buffer). So each 128-row block reads `[g] * r + [-1] * (128 - r)`.
  Under jit, a row that breaks this (a block that mixes groups, a group row after padding, an
  index outside [-1, G)) comes out NaN.

  Args:
    a: `(a_fp8 [m_sum, k] float8_e4m3fn, sa [m_sum, k/128] float32)`; m_sum a multiple of 128.
    b: `(b_fp8 [G, n, k] float8_e4m3fn, sb [G, ceil(n/128), k/128] float32)`.
    m_indices: `[m_sum]` int32, each row's group in [0, G), or -1 for padding.
    out_dtype: bfloat16 (default) or float32.
    implementation: a backend name, or None for the platform's best.
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `d [m_sum, n]` of `out_dtype`.
  """
  dims, out_dtype, m_indices = validation.check_m_grouped_contiguous(a, b, m_indices, out_dtype)
  d = _run("m_grouped_gemm_nt_contiguous", implementation, a, b, m_indices, out_dtype=out_dtype,
           interpret=bool(interpret))
  is_padding, broken = layout.contiguous_row_status(m_indices, dims.num_groups)
  return jnp.where(broken[:, None], jnp.nan, jnp.where(is_padding[:, None], 0, d)).astype(out_dtype)


def m_grouped_gemm_nt_masked(a, b, masked_m, expected_m: int, *, out_dtype=None,
                             implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """Grouped `d[g, r] = a[g, r] @ b[g].T` for the first `masked_m[g]` rows (low-latency decode).

  The rest of each group's rows are zero. Under jit, a group whose traced `masked_m` is outside
  [0, m_max] comes out NaN.

  Args:
    a: `(a_fp8 [G, m_max, k] float8_e4m3fn, sa [G, m_max, k/128] float32)`.
    b: `(b_fp8 [G, n, k] float8_e4m3fn, sb [G, ceil(n/128), k/128] float32)`.
    masked_m: `[G]` int32, valid rows per group.
    expected_m: a static hint of the typical `masked_m`, for kernel tiling.
    out_dtype: bfloat16 (default) or float32.
    implementation: a backend name, or None for the platform's best.
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `d [G, m_max, n]` of `out_dtype`.
  """
  dims, out_dtype, masked_m = validation.check_m_grouped_masked(a, b, masked_m, expected_m, out_dtype)
  d = _run("m_grouped_gemm_nt_masked", implementation, a, b, masked_m, int(expected_m), out_dtype=out_dtype,
           interpret=bool(interpret))
  valid = jnp.arange(dims.m, dtype=jnp.int32)[None, :] < masked_m[:, None]
  broken = (masked_m < 0) | (masked_m > dims.m)  # traced counts that cannot be right
  d = jnp.where(valid[..., None], d, 0)
  return jnp.where(broken[:, None, None], jnp.nan, d).astype(out_dtype)


def k_grouped_gemm_tn_contiguous(a, b, ks, *, c=None, implementation: str | None = None,
                                 interpret: bool = False) -> jax.Array:
  """Per group g, `d[g] = c[g] + a_g.T @ b_g` in float32: the weight gradients of grouped layers.

  `a_g` and `b_g` are the g-th contiguous blocks of `ks[g]` rows; both operands carry one
  scale per 128x1 tile (`quantize_per_channel`), so every `ks[g]` is a multiple of 128. Rows
  past `sum(ks)` are padding and are ignored. Under jit, traced `ks` that break these rules
  make the whole output NaN.

  Args:
    a: `(a_fp8 [sum_k, m] float8_e4m3fn, sa [sum_k/128, m] float32)`.
    b: `(b_fp8 [sum_k, n] float8_e4m3fn, sb [sum_k/128, n] float32)`; n a multiple of 64.
    ks: `[G]` ints (a list, or an int32 array that may be traced), rows per group.
    c: optional `[G, m, n]` float32 added to the product.
    implementation: a backend name, or None for the platform's best.
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `d [G, m, n]` float32.
  """
  dims, ks = validation.check_k_grouped(a, b, ks, c)
  d = _run("k_grouped_gemm_tn_contiguous", implementation, a, b, ks, c=c, interpret=bool(interpret))
  broken = jnp.any((ks < 0) | (ks % BLOCK != 0)) | (jnp.sum(ks) > dims.k)  # traced ks only
  return jnp.where(broken, jnp.nan, d)
