"""Decode problems built the way FlashMLA's tests build them, and FlashMLA's comparison.

- q and the cache are `normal / 10`, clamped to [-1, 1].
- The block table is a random permutation of pages; entries past a request's length hold
  2147480000, so following one is an out-of-bounds read.
- Every cached token at or past its request's length is NaN, so reading it poisons the output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla
from mla.api import IMPLEMENTATIONS, PLATFORMS

UNUSED_PAGE = 2147480000
D_QK, D_V = 576, 512


def implementations() -> list:
  """pytest params: every registered backend; those that cannot run on CPU are marked gpu."""
  return [pytest.param(name, marks=() if "cpu" in PLATFORMS.get(name, ()) else pytest.mark.gpu)
          for name in sorted(IMPLEMENTATIONS)]


class Problem(NamedTuple):
  q: jax.Array  # [b, s_q, h_q, d]
  k_cache: jax.Array  # [num_pages, 64, h_kv, d], NaN past each length
  block_table: jax.Array  # [b, max_blocks] int32
  cache_seqlens: jax.Array  # [b] int32


def lengths(seed: int, batch: int, mean: int, varlen: bool) -> np.ndarray:
  """FlashMLA's varlen lengths: max(N(mean, mean/2), 0) rounded, or all equal to `mean`."""
  if not varlen:
    return np.full(batch, mean, np.int32)
  rng = np.random.default_rng(seed)
  return np.maximum(rng.normal(mean, mean / 2, batch), 0).round().astype(np.int32)


def make_problem(seed: int, seqlens, seq_q: int, heads_q: int, heads_k: int, *, dim: int = D_QK,
                 dtype=jnp.bfloat16, spare_blocks: int = 1) -> Problem:
  seqlens = np.asarray(seqlens, np.int32)
  batch = len(seqlens)
  used = -(-seqlens // 64)
  max_blocks = int(used.max(initial=0)) + spare_blocks
  rng = np.random.default_rng(seed)
  num_pages = batch * max_blocks
  table = rng.permutation(num_pages).reshape(batch, max_blocks).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 2)
  q = jnp.clip(jax.random.normal(keys[0], (batch, seq_q, heads_q, dim)) / 10, -1, 1).astype(dtype)
  cache = np.array(jnp.clip(jax.random.normal(keys[1], (num_pages, 64, heads_k, dim)) / 10, -1, 1))
  for r in range(batch):
    for block in range(max_blocks):
      start = block * 64
      if start + 64 > seqlens[r]:
        cache[table[r, block], max(seqlens[r] - start, 0):] = np.nan
    table[r, used[r]:] = UNUSED_PAGE
  return Problem(q, jnp.asarray(cache).astype(dtype), jnp.asarray(table), jnp.asarray(seqlens))


def metadata(problem: Problem, *, num_sms: int = 132):
  _, seq_q, heads_q, _ = problem.q.shape
  heads_k = problem.k_cache.shape[2]
  return mla.get_mla_metadata(problem.cache_seqlens, seq_q * heads_q // heads_k, heads_k, num_sms=num_sms)


def oracle(problem: Problem, *, causal: bool, head_dim_v: int = D_V, k_cache=None, is_fp8_kvcache=False):
  dim = problem.q.shape[-1]
  return mla.dense_decode(problem.q, problem.k_cache if k_cache is None else k_cache, problem.block_table,
                          problem.cache_seqlens, head_dim_v=head_dim_v, softmax_scale=dim ** -0.5,
                          causal=causal and problem.q.shape[1] > 1, is_fp8_kvcache=is_fp8_kvcache)


def cos_diff(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x.astype(np.float64), y.astype(np.float64)
  denominator = (x * x + y * y).sum()
  return 0.0 if denominator == 0 else float(1 - 2 * (x * y).sum() / max(denominator, 1e-12))


def assert_close(name: str, got, want, *, abs_tol: float, rel_tol: float, cos_tol: float | None = None):
  """FlashMLA's comparison: inf and NaN in the same places; elsewhere abs or rel; and cosine."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN positions differ")
  for sign in (np.inf, -np.inf):
    np.testing.assert_array_equal(got == sign, want == sign, err_msg=f"{name}: {sign} positions differ")
  finite = np.isfinite(want)
  error = np.abs(got[finite] - want[finite])
  bad = (error > abs_tol) & (error > rel_tol * np.abs(want[finite]))
  assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} elements off, worst {error.max():.3g}"
  if cos_tol is not None:
    assert cos_diff(got[finite], want[finite]) < cos_tol, name


def assert_matches_oracle(out, lse, want_out, want_lse):
  assert_close("out", out, want_out, abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=1e-5)
  assert_close("lse", lse, want_lse, abs_tol=1e-6, rel_tol=8.01 / 65536)
