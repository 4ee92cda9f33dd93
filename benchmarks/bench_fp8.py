"""The four FP8 GEMMs and the FP8 linear layer, against a bf16 matmul of the same shape in the same process.

  python -m benchmarks.bench_fp8 [--shapes=auto|cpu|deepgemm] [--implementation=xla] [--repeats=10]

`deepgemm` is DeepGEMM's shapes table (reference/kernels.md §2.3); `cpu` divides it down so
2 cores finish in about a minute; `auto` picks by platform. Accounting is DeepGEMM's: TFLOPS
from `2 * valid_rows * n * k`, and GB/s from every byte read or written, scales included
(for the masked layout only the valid share of a and d counts, as DeepGEMM's tests do).
The baseline is `jnp.dot` on bf16 operands with f32 accumulation (grouped: `jnp.einsum` or
`jax.lax.ragged_dot`), so `vs_bf16` > 1 means the FP8 path is faster. On CPU the xla path
upcasts fp8 to f32 for every k block, so only the ratio is informative there.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp8
from benchmarks.harness import append_results, format_table, time_fn

# (m, n, k) of DeepGEMM's normal GEMMs, and (groups, rows per group, n, k) of the grouped ones.
DEEPGEMM = {
    "gemm_nt": [(m, n, k) for m in (64, 128, 4096) for n, k in
                ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))],
    "contiguous": [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)],
    "masked": [(g, m, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in ((4096, 7168), (7168, 2048))],
    # k-grouped: (groups, m, n, k per group)
    "k_grouped": [(4, 4096, 7168, 8192), (4, 7168, 2048, 8192), (8, 4096, 7168, 4096), (16, 4096, 7168, 2048)],
    # linear: (tokens, in_features, out_features), DeepSeek-V3 projections
    "linear": [(4096, 7168, 2112), (4096, 7168, 4096), (4096, 2048, 7168)],
}
CPU = {
    "gemm_nt": [(64, 256, 896), (128, 3072, 256), (512, 896, 2048), (512, 512, 896)],
    "contiguous": [(4, 256, 512, 896), (8, 128, 896, 256)],
    "masked": [(2, 64, 512, 896), (4, 32, 896, 256)],
    "k_grouped": [(4, 448, 256, 512), (8, 256, 448, 256)],
    "linear": [(512, 896, 256), (512, 256, 896)],
}


def _bytes(*arrays) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(arrays) if a is not None)


def _normal(seed: int, shape, dtype=jnp.bfloat16):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _row(op: str, case: str, impl, base, flops: float, nbytes: int, implementation: str) -> dict:
  t = impl.median_s
  return {"suite": "fp8", "case": f"{op} {case}", "impl": implementation,
          "median_ms": round(t * 1e3, 3), "iqr_ms": round(impl.iqr_s * 1e3, 3),
          "tflops": round(flops / t / 1e12, 3), "gb_s": round(nbytes / t / 1e9, 2),
          "bf16_ms": round(base.median_s * 1e3, 3), "vs_bf16": round(base.median_s / t, 3)}


def bench_gemm_nt(shapes, implementation, repeats):
  rows = []
  for m, n, k in shapes:
    x, w = _normal(1, (m, k)), _normal(2, (n, k))
    a, b = fp8.quantize_per_token(x), fp8.quantize_per_block(w)
    gemm = jax.jit(functools.partial(fp8.gemm_nt, implementation=implementation))
    base = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    timing = time_fn(gemm, a, b, repeats=repeats)
    baseline = time_fn(base, x, w, repeats=repeats)
    d = gemm(a, b)
    rows.append(_row("gemm_nt", f"m={m} n={n} k={k}", timing, baseline, 2 * m * n * k, _bytes(a, b, d),
                     implementation))
  return rows


def bench_contiguous(shapes, implementation, repeats):
  rows = []
  for groups, m_per_group, n, k in shapes:
    sizes = np.random.default_rng(groups).integers(int(0.7 * m_per_group), int(1.3 * m_per_group), groups)
    m_sum = int(sum(-(-s // 128) * 128 for s in sizes))
    m_indices, _ = fp8.contiguous_m_indices(jnp.asarray(sizes), m_sum)
    x, w = _normal(3, (m_sum, k)), _normal(4, (groups, n, k))
    a, b = fp8.quantize_per_token(x), fp8.quantize_per_block(w)
    gemm = jax.jit(functools.partial(fp8.m_grouped_gemm_nt_contiguous, implementation=implementation))
    aligned = jnp.asarray([m_sum // groups] * groups, jnp.int32).at[-1].add(m_sum % groups)
    base = jax.jit(lambda x, w: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), aligned,
                                                  preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    timing = time_fn(gemm, a, b, m_indices, repeats=repeats)
    baseline = time_fn(base, x, w, repeats=repeats)
    d = gemm(a, b, m_indices)
    valid = int(sizes.sum())
    rows.append(_row("m_grouped_contiguous", f"{groups}x{m_per_group} n={n} k={k}", timing, baseline,
                     2 * valid * n * k, _bytes(a, b, m_indices, d), implementation))
  return rows


def bench_masked(shapes, implementation, repeats):
  rows = []
  for groups, m_max, n, k in shapes:
    masked = np.random.default_rng(groups).integers(int(0.7 * m_max), m_max + 1, groups)
    expected_m = int(masked.mean()) + 1
    x, w = _normal(5, (groups, m_max, k)), _normal(6, (groups, n, k))
    a, b = fp8.quantize_per_token(x), fp8.quantize_per_block(w)
    gemm = jax.jit(functools.partial(fp8.m_grouped_gemm_nt_masked, expected_m=expected_m,
                                     implementation=implementation))
    base = jax.jit(lambda x, w: jnp.einsum("gmk,gnk->gmn", x, w,
                                           preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    masked_m = jnp.asarray(masked, jnp.int32)
    timing = time_fn(gemm, a, b, masked_m, repeats=repeats)
    baseline = time_fn(base, x, w, repeats=repeats)
    d = gemm(a, b, masked_m)
    valid = int(masked.sum())
    nbytes = _bytes(a, d) * valid / (m_max * groups) + _bytes(b)
    rows.append(_row("m_grouped_masked", f"{groups}x{m_max} n={n} k={k}", timing, baseline, 2 * valid * n * k,
                     int(nbytes), implementation))
  return rows


def bench_k_grouped(shapes, implementation, repeats):
  rows = []
  for groups, m, n, k_per_group in shapes:
    ks = [k_per_group] * groups
    sum_k = sum(ks)
    x, y = _normal(7, (sum_k, m)), _normal(8, (sum_k, n))
    a, b = fp8.quantize_per_channel(x), fp8.quantize_per_channel(y)
    ks_array = jnp.asarray(ks, jnp.int32)
    gemm = jax.jit(functools.partial(fp8.k_grouped_gemm_tn_contiguous, implementation=implementation))
    base = jax.jit(lambda x, y: jnp.einsum("gkm,gkn->gmn", x.reshape(groups, k_per_group, m),
                                           y.reshape(groups, k_per_group, n), preferred_element_type=jnp.float32))
    timing = time_fn(gemm, a, b, ks_array, repeats=repeats)
    baseline = time_fn(base, x, y, repeats=repeats)
    d = gemm(a, b, ks_array)
    rows.append(_row("k_grouped_tn", f"{groups}x{k_per_group} m={m} n={n}", timing, baseline, 2 * m * n * sum_k,
                     _bytes(a, b, d), implementation))
  return rows


def bench_linear(shapes, implementation, repeats):
  """Forward plus backward (3 GEMMs and 4 quantizations) against the same in bf16."""
  rows = []
  for tokens, k_in, n_out in shapes:
    x, w, dy = _normal(9, (tokens, k_in)), _normal(10, (n_out, k_in)), _normal(11, (tokens, n_out))

    def step(linear_fn, x, w, dy):
      y, back = jax.vjp(linear_fn, x, w)
      return y, *back(dy)

    fp8_step = jax.jit(functools.partial(step, functools.partial(fp8.linear, implementation=implementation)))
    bf16_step = jax.jit(functools.partial(step, lambda x, w: x @ w.T))
    timing = time_fn(fp8_step, x, w, dy, repeats=repeats)
    baseline = time_fn(bf16_step, x, w, dy, repeats=repeats)
    rows.append(_row("linear fwd+bwd", f"t={tokens} in={k_in} out={n_out}", timing, baseline,
                     3 * 2 * tokens * k_in * n_out, _bytes(x, w, dy) * 2, implementation))
  return rows


def run(shapes: str = "auto", implementation: str = "xla", repeats: int = 10) -> list[dict]:
  if shapes == "auto":
    shapes = "deepgemm" if jax.default_backend() == "gpu" else "cpu"
  table = {"deepgemm": DEEPGEMM, "cpu": CPU}[shapes]
  return (bench_gemm_nt(table["gemm_nt"], implementation, repeats)
          + bench_contiguous(table["contiguous"], implementation, repeats)
          + bench_masked(table["masked"], implementation, repeats)
          + bench_k_grouped(table["k_grouped"], implementation, repeats)
          + bench_linear(table["linear"], implementation, repeats))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_enum("shapes", "auto", ["auto", "cpu", "deepgemm"], "Shape table: DeepGEMM's, or scaled down for CPU.")
  flags.DEFINE_string("implementation", "xla", "fp8 backend to time.")
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (after 2 warm-up calls).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.shapes, FLAGS.implementation, FLAGS.repeats)
  append_results("fp8", rows, command=" ".join(["python -m benchmarks.bench_fp8", *sys.argv[1:]]))
  print(format_table(rows, ["case", "impl", "median_ms", "iqr_ms", "tflops", "gb_s", "bf16_ms", "vs_bf16"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
