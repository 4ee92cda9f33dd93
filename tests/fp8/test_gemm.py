"""The shared suite of the four FP8 GEMMs, run against every registered implementation.

A backend joins by registering in `fp8.api.IMPLEMENTATIONS`; these tests then cover it. CPU
shapes are DeepGEMM's test shapes scaled down; the real ones run under `gpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8
from tests.fp8 import cases

ACCURACY = 1e-3  # DeepGEMM's bar against the unquantized product
EXACTNESS = 1e-6  # against float64 on the dequantized operands: only f32 rounding may differ


_impls = cases.implementations


def _check(out, problem: cases.Problem, *, out_dtype=jnp.bfloat16):
  assert out.dtype == out_dtype
  assert out.shape == problem.ref.shape
  out = cases.f64(out)
  assert not np.isnan(out).any(), "a NaN leaked: a padding or masked-out row was read"
  # Padding, masked-out rows and empty groups are exactly zero, not merely small.
  assert (out[problem.ref == 0] == 0).all()
  assert fp8.calc_diff(out, problem.ref) < ACCURACY
  exactness = EXACTNESS if out_dtype == jnp.float32 else 1e-5  # bf16 output rounding
  assert fp8.calc_diff(out, problem.exact) < exactness


# DeepGEMM's (n, k) pairs divided by 8 or 16, each kept a multiple of 64 / 128.
NORMAL_NK = [(256, 896), (3072, 128), (4096, 128), (896, 2048), (512, 896), (896, 256)]


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
@pytest.mark.parametrize("m", [1, 64, 200])
@pytest.mark.parametrize("n,k", NORMAL_NK[:2] + NORMAL_NK[3:4])
def test_gemm_nt_accuracy(implementation, m, n, k):
  cases.skip_if_too_big_to_interpret(implementation, m * n)
  if cases.interpreted(implementation) and n * k > 256 * 1024:
    pytest.skip("k too long for interpret mode; runs natively on a GPU")
  problem = cases.gemm_nt_problem(m * 7 + n, m, n, k)
  _check(fp8.gemm_nt(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
@pytest.mark.parametrize("n", [64, 192])  # n below one 128 block, and a partial last block
def test_gemm_nt_partial_weight_blocks(implementation, n):
  problem = cases.gemm_nt_problem(3, 96, n, 384)
  _check(fp8.gemm_nt(*problem.args, out_dtype=jnp.float32, **cases.backend(implementation)), problem,
         out_dtype=jnp.float32)


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
def test_gemm_nt_adds_c_in_f32(implementation):
  problem = cases.gemm_nt_problem(5, 128, 256, 512, with_c=True)
  out = fp8.gemm_nt(*problem.args, **problem.kwargs, **cases.backend(implementation))
  _check(out, problem, out_dtype=jnp.float32)


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
def test_gemm_nt_ue8m0(implementation):
  problem = cases.gemm_nt_problem(6, 128, 256, 768, ue8m0=True)
  _check(fp8.gemm_nt(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
def test_gemm_nt_applies_each_k_blocks_scales(implementation):
  """k blocks of very different magnitude: a scale applied to the wrong block shows at once."""
  m, n, k = 64, 128, 512
  x = cases.normal(7, (m, k), jnp.float32) * jnp.repeat(jnp.array([1e-6, 1.0, 1e3, 1e-3]), 128)
  w = cases.normal(8, (n, k), jnp.float32) * jnp.repeat(jnp.array([1e4, 1.0, 1e-5, 10.0]), 128)
  a, b = fp8.quantize_per_token(x), fp8.quantize_per_block(w)
  out = fp8.gemm_nt(a, b, out_dtype=jnp.float32, **cases.backend(implementation))
  ref = cases.f64(x) @ cases.f64(w).T
  assert fp8.calc_diff(out, ref) < ACCURACY


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
def test_gemm_nt_jit_and_vmap(implementation):
  problems = [cases.gemm_nt_problem(seed, 64, 128, 256) for seed in (10, 20, 30)]
  gemm = functools.partial(fp8.gemm_nt, out_dtype=jnp.float32, **cases.backend(implementation))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p.args for p in problems])
  out = jax.jit(jax.vmap(gemm))(*stacked)
  for i, problem in enumerate(problems):
    np.testing.assert_allclose(cases.f64(out[i]), problem.exact, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(jax.jit(gemm)(*problems[0].args), gemm(*problems[0].args))


@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
def test_gemm_nt_empty_m_and_k(implementation):
  problem = cases.gemm_nt_problem(9, 0, 128, 256)
  assert fp8.gemm_nt(*problem.args, **cases.backend(implementation)).shape == (0, 128)
  problem = cases.gemm_nt_problem(9, 32, 128, 0, with_c=True)
  out = fp8.gemm_nt(*problem.args, **problem.kwargs, **cases.backend(implementation))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(problem.kwargs["c"]))


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous", "m_grouped_gemm_nt_masked",
                                                  "k_grouped_gemm_tn_contiguous"))
def test_grouped_empty_inputs(implementation):
  a = fp8.quantize_per_token(jnp.zeros((0, 256)))
  b = fp8.quantize_per_block(jnp.ones((2, 128, 256)))
  out = fp8.m_grouped_gemm_nt_contiguous(a, b, jnp.zeros((0,), jnp.int32), **cases.backend(implementation))
  assert out.shape == (0, 128)
  a = fp8.quantize_per_token(jnp.zeros((2, 0, 256)))
  out = fp8.m_grouped_gemm_nt_masked(a, b, jnp.zeros(2, jnp.int32), 1, **cases.backend(implementation))
  assert out.shape == (2, 0, 128)
  empty_k = fp8.quantize_per_channel(jnp.zeros((0, 64)))
  out = fp8.k_grouped_gemm_tn_contiguous(empty_k, fp8.quantize_per_channel(jnp.zeros((0, 128))), [0],
                                         **cases.backend(implementation))
  np.testing.assert_array_equal(np.asarray(out), np.zeros((1, 64, 128)))


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous", "m_grouped_gemm_nt_masked",
                                                  "k_grouped_gemm_tn_contiguous"))
def test_grouped_under_vmap(implementation):
  contiguous = [cases.contiguous_problem(seed, [100, 28], 128, 256) for seed in (40, 41)]
  masked = [cases.masked_problem(seed, [3, 30], 32, 128, 256) for seed in (42, 43)]
  k_grouped = [cases.k_grouped_problem(seed, [128, 0, 256], 64, 128) for seed in (44, 45)]
  stack = lambda problems, n: jax.tree.map(lambda *xs: jnp.stack(xs), *[p.args[:n] for p in problems])
  runs = [
      (contiguous, jax.vmap(functools.partial(fp8.m_grouped_gemm_nt_contiguous, out_dtype=jnp.float32,
                                              **cases.backend(implementation))), stack(contiguous, 3)),
      (masked, jax.vmap(functools.partial(fp8.m_grouped_gemm_nt_masked, expected_m=16, out_dtype=jnp.float32,
                                          **cases.backend(implementation))), stack(masked, 3)),
      (k_grouped, jax.vmap(functools.partial(fp8.k_grouped_gemm_tn_contiguous, **cases.backend(implementation))),
       (*stack(k_grouped, 2), jnp.array([p.args[2] for p in k_grouped], jnp.int32))),
  ]
  for problems, mapped, args in runs:
    out = mapped(*args)
    for i, problem in enumerate(problems):
      _check(out[i], problem, out_dtype=jnp.float32)


# ---- m-grouped, contiguous layout ----

@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous"))
@pytest.mark.parametrize("group_sizes,n,k", [
    ([300, 128, 45, 200], 256, 896),  # 4 groups, ragged, DeepGEMM's (4, 8192, 7168, 4096) / 16-32
    ([130, 0, 257, 64, 1, 90, 128, 0], 448, 256),  # 8 groups with two empty ones
    ([70, 0, 45, 100], 128, 384),  # 4 ragged groups, one empty: small enough to interpret
])
def test_contiguous_accuracy(implementation, group_sizes, n, k):
  cases.skip_if_too_big_to_interpret(implementation, sum(-(-s // 128) * 128 for s in group_sizes) * n)
  problem = cases.contiguous_problem(sum(group_sizes), group_sizes, n, k)
  _check(fp8.m_grouped_gemm_nt_contiguous(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous"))
def test_contiguous_trailing_padding_and_ue8m0(implementation):
  """Two all-padding blocks at the end (a capacity-sized buffer); UE8M0 scales."""
  problem = cases.contiguous_problem(11, [70, 150], 128, 384, m_sum=640, ue8m0=True)
  out = fp8.m_grouped_gemm_nt_contiguous(*problem.args, out_dtype=jnp.float32, **cases.backend(implementation))
  _check(out, problem, out_dtype=jnp.float32)
  assert not np.asarray(out[384:]).any()


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous"))
def test_contiguous_jit_with_traced_indices(implementation):
  problem = cases.contiguous_problem(12, [100, 0, 140], 192, 256)
  gemm = jax.jit(functools.partial(fp8.m_grouped_gemm_nt_contiguous, out_dtype=jnp.float32,
                                   **cases.backend(implementation)))
  _check(gemm(*problem.args), problem, out_dtype=jnp.float32)


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous"))
def test_contiguous_broken_layout_under_jit_is_nan(implementation):
  a, b, m_indices = cases.contiguous_problem(13, [128, 128], 128, 128).args
  gemm = jax.jit(functools.partial(fp8.m_grouped_gemm_nt_contiguous, **cases.backend(implementation)))
  out = np.asarray(gemm(a, b, m_indices.at[3].set(1)), np.float32)  # row 3 strays into group 1
  assert np.isnan(out[:128]).any() and not np.isnan(out[128:]).any()
  out = np.asarray(gemm(a, b, m_indices.at[200].set(7)), np.float32)  # no group 7
  assert np.isnan(out[200]).all()


# ---- m-grouped, masked layout ----

@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_masked"))
@pytest.mark.parametrize("masked_m,m_max,n,k", [
    ([64, 0, 17, 128], 128, 256, 896),  # a group with no rows and a full one
    ([5], 64, 448, 256),
    ([0, 0], 32, 128, 128),
])
def test_masked_accuracy(implementation, masked_m, m_max, n, k):
  cases.skip_if_too_big_to_interpret(implementation, len(masked_m) * m_max * n)
  problem = cases.masked_problem(len(masked_m) + m_max, masked_m, m_max, n, k)
  _check(fp8.m_grouped_gemm_nt_masked(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_masked"))
def test_masked_jit_ue8m0_and_broken_counts(implementation):
  problem = cases.masked_problem(14, [3, 60, 0], 64, 192, 384, ue8m0=True)
  a, b, masked_m, expected_m = problem.args
  gemm = jax.jit(functools.partial(fp8.m_grouped_gemm_nt_masked, expected_m=expected_m,
                                   out_dtype=jnp.float32, **cases.backend(implementation)))
  _check(gemm(a, b, masked_m), problem, out_dtype=jnp.float32)
  out = np.asarray(gemm(a, b, masked_m.at[1].set(65)))  # more rows than the buffer holds
  assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2]]).any()


# ---- k-grouped, for weight gradients ----

@pytest.mark.parametrize("implementation", _impls("k_grouped_gemm_tn_contiguous"))
@pytest.mark.parametrize("ks,m,n", [
    ([512, 512, 256, 768], 448, 128),  # DeepGEMM's (4, 7168, 2048, 8192) / 16
    ([256, 0, 384], 256, 448),  # one k equal to 0
    ([128], 64, 64),
    ([256, 0, 128, 384], 128, 128),  # 4 groups, one empty: small enough to interpret
])
def test_k_grouped_accuracy(implementation, ks, m, n):
  cases.skip_if_too_big_to_interpret(implementation, len(ks) * m * n)
  problem = cases.k_grouped_problem(sum(ks) + m, ks, m, n)
  out = fp8.k_grouped_gemm_tn_contiguous(*problem.args, **cases.backend(implementation))
  _check(out, problem, out_dtype=jnp.float32)
  assert not np.asarray(out)[np.asarray(ks) == 0].any()


@pytest.mark.parametrize("implementation", _impls("k_grouped_gemm_tn_contiguous"))
def test_k_grouped_c_padding_rows_and_ue8m0(implementation):
  problem = cases.k_grouped_problem(15, [128, 256], 192, 128, sum_k=640, with_c=True, ue8m0=True)
  out = fp8.k_grouped_gemm_tn_contiguous(*problem.args, **problem.kwargs, **cases.backend(implementation))
  _check(out, problem, out_dtype=jnp.float32)


@pytest.mark.parametrize("implementation", _impls("k_grouped_gemm_tn_contiguous"))
def test_k_grouped_jit_with_traced_ks(implementation):
  problem = cases.k_grouped_problem(16, [384, 0, 128], 128, 192, sum_k=640)
  a, b, ks = problem.args
  gemm = jax.jit(functools.partial(fp8.k_grouped_gemm_tn_contiguous, **cases.backend(implementation)))
  _check(gemm(a, b, jnp.array(ks, jnp.int32)), problem, out_dtype=jnp.float32)
  assert np.isnan(np.asarray(gemm(a, b, jnp.array([100, 0, 128], jnp.int32)))).all()  # not a multiple of 128


# ---- real DeepGEMM shapes, on a GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("implementation", _impls("gemm_nt"))
@pytest.mark.parametrize("m", [64, 128, 4096])
@pytest.mark.parametrize("n,k", [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
                                 (7168, 2048)])
def test_gemm_nt_deepgemm_shapes(implementation, m, n, k):
  problem = cases.gemm_nt_problem(m + n + k, m, n, k)
  _check(fp8.gemm_nt(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_contiguous"))
@pytest.mark.parametrize("groups,m,k,n", [(4, 8192, 7168, 4096), (4, 8192, 2048, 7168), (8, 4096, 7168, 4096),
                                          (8, 4096, 2048, 7168)])
def test_contiguous_deepgemm_shapes(implementation, groups, m, k, n):
  sizes = list(np.random.default_rng(groups + m).integers(int(0.7 * m), int(1.3 * m), groups))
  problem = cases.contiguous_problem(groups + n, sizes, n, k)
  _check(fp8.m_grouped_gemm_nt_contiguous(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", _impls("m_grouped_gemm_nt_masked"))
@pytest.mark.parametrize("groups,m_max", [(1, 1024), (2, 512), (4, 256)])
@pytest.mark.parametrize("k,n", [(7168, 4096), (2048, 7168)])
def test_masked_deepgemm_shapes(implementation, groups, m_max, k, n):
  masked_m = list(np.random.default_rng(groups).integers(64, 385, groups).clip(max=m_max))
  problem = cases.masked_problem(groups + k, masked_m, m_max, n, k)
  _check(fp8.m_grouped_gemm_nt_masked(*problem.args, **cases.backend(implementation)), problem)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", _impls("k_grouped_gemm_tn_contiguous"))
@pytest.mark.parametrize("groups,m,n,k_per_group", [(4, 4096, 7168, 8192), (4, 7168, 2048, 8192),
                                                    (8, 4096, 7168, 4096), (16, 4096, 7168, 2048)])
def test_k_grouped_deepgemm_shapes(implementation, groups, m, n, k_per_group):
  ks = [k_per_group] * groups
  ks[1] = 0  # as DeepGEMM's generator may
  problem = cases.k_grouped_problem(groups + m, ks, m, n)
  out = fp8.k_grouped_gemm_tn_contiguous(*problem.args, **cases.backend(implementation))
  _check(out, problem, out_dtype=jnp.float32)
