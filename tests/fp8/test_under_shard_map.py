"""The xla GEMMs inside `jax.shard_map` (where the MoE layer calls them): same results as outside.

Under shard_map a loop carry must vary over the mesh axis like the operands; a zero-initialized
carry did not, and tracing failed. Each rank here multiplies its own operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import fp8

RANKS = 8


def _per_rank(fn, *arrays):
  mesh = jax.make_mesh((RANKS,), ("ep",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
  inner = lambda *blocks: fn(*(b[0] for b in blocks))[None]
  return np.asarray(jax.jit(jax.shard_map(inner, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(*map(put, arrays)))


def test_the_four_gemms_under_shard_map():
  keys = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(keys[0], (RANKS, 2, 128, 256), jnp.float32)
  b = jax.random.normal(keys[1], (RANKS, 2, 128, 256), jnp.float32)
  kb = jax.random.normal(keys[2], (RANKS, 256, 128), jnp.float32)
  masked_m = jnp.tile(jnp.array([[100, 7]], jnp.int32), (RANKS, 1))
  m_indices = jnp.tile(jnp.repeat(jnp.array([0, 1], jnp.int32), 128)[None], (RANKS, 1))

  ops = {
      "gemm_nt": lambda a, b, *_: fp8.gemm_nt(fp8.quantize_per_token(a[0]), fp8.quantize_per_block(b[0]),
                                              out_dtype=jnp.float32, implementation="xla"),
      "masked": lambda a, b, m, *_: fp8.m_grouped_gemm_nt_masked(
          fp8.quantize_per_token(a), fp8.quantize_per_block(b), m, 128, out_dtype=jnp.float32, implementation="xla"),
      "contiguous": lambda a, b, m, idx, *_: fp8.m_grouped_gemm_nt_contiguous(
          fp8.quantize_per_token(a.reshape(256, 256)), fp8.quantize_per_block(b), idx, out_dtype=jnp.float32,
          implementation="xla"),
      "k_grouped": lambda a, b, m, idx, k: fp8.k_grouped_gemm_tn_contiguous(
          fp8.quantize_per_channel(k), fp8.quantize_per_channel(k), jnp.array([128, 128], jnp.int32),
          implementation="xla"),
  }
  for name, op in ops.items():
    got = _per_rank(op, a, b, masked_m, m_indices, kb)
    for r in (0, RANKS - 1):
      want = np.asarray(op(a[r], b[r], masked_m[r], m_indices[r], kb[r]))
      np.testing.assert_array_equal(got[r], want, err_msg=name)


def test_linear_gradient_of_a_replicated_weight_is_summed_over_ranks():
  """Tokens split over `ep`, the weight replicated: its gradient is the sum of every rank's, as outside shard_map."""
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (RANKS * 16, 256), jnp.float32)
  w = jax.random.normal(keys[1], (128, 256), jnp.float32) / 16
  loss = lambda x, w: jnp.sum(fp8.linear(x, w, implementation="xla") ** 2)
  want_dx, want_dw = jax.grad(loss, argnums=(0, 1))(x, w)

  mesh = jax.make_mesh((RANKS,), ("ep",))
  sharded = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(P("ep"), P()),
                          out_specs=(P("ep"), P()))
  dx, dw = jax.jit(sharded)(jax.device_put(x, NamedSharding(mesh, P("ep"))), w)
  # Per-token quantization of x and dy is row-local, so each rank's share is the same computation;
  # only the per-channel wgrad scales (over 16 rows instead of 128) and the sum's order differ.
  np.testing.assert_allclose(dx, want_dx, rtol=0, atol=1e-6 * np.abs(want_dx).max())
  np.testing.assert_allclose(dw, want_dw, rtol=0, atol=0.05 * np.abs(want_dw).max())
  assert jax.typeof(dw).sharding.spec == P() or dw.sharding.is_fully_replicated
