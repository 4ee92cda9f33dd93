"""Low-latency dispatch and combine on 8 CPU devices: DeepEP's test_low_latency checks at small sizes.

As in DeepEP's test, x holds the source rank, its last columns the source token, some top-k
slots are -1, and each expert's received block from source j must read j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import expert_parallel as ep
import fp8
from tests.expert_parallel import helpers
from tests.expert_parallel.helpers import RANKS

T, M, K, E, H = 5, 8, 3, 16, 256


def _problem(seed):
  topk = helpers.routing(seed, T, K, E, empty_slots=6, skip_expert=3)
  x = np.array(jax.random.normal(jax.random.key(seed), (RANKS, T, H)), np.float32)
  x[..., :128] = np.arange(RANKS)[:, None, None] - 128.0  # DeepEP: x = rank - 128
  x[..., -128:] = np.arange(T)[None, :, None]  # and the token index in the last 128 columns
  weights = np.random.default_rng(seed).random((RANKS, T, K)).astype(np.float32)
  return jnp.asarray(x, jnp.bfloat16), jnp.asarray(topk), jnp.asarray(weights), topk


@pytest.mark.parametrize("use_fp8", [False, True])
def test_counts_masked_layout_and_weighted_combine(use_fp8):
  x, topk, weights, topk_np = _problem(0 + use_fp8)
  num_local = E // RANKS

  def fn(x, topk, w):
    recv, count, handle = ep.low_latency_dispatch(x, topk, num_max_dispatch_tokens_per_rank=M, num_experts=E,
                                                  use_fp8=use_fp8)
    values = fp8.dequantize(*recv) if use_fp8 else recv.astype(jnp.float32)
    valid = jnp.arange(values.shape[1])[None, :, None] < count[:, None, None]
    poisoned = jnp.where(valid, values, jnp.nan)  # rows past recv_count must not be read
    # Each expert's output differs (x times 1 + its global id / 16), so a row sent to the wrong token or
    # weighed for the wrong expert shows.
    expert = jax.lax.axis_index("ep") * num_local + jnp.arange(num_local)
    y = poisoned * (1 + expert / 16)[:, None, None]
    out = ep.low_latency_combine(y.astype(jnp.bfloat16), topk, w, handle)
    return values, count, handle, out

  values, count, handle, out = helpers.run(fn, x, topk, weights)
  assert values.shape == (RANKS, num_local, RANKS * M, H)
  for r, e in np.ndindex(RANKS, num_local):
    expert = r * num_local + e
    senders = [(s, t) for s in range(RANKS) for t in range(T) if expert in topk_np[s, t]]
    assert count[r, e] == len(senders)
    np.testing.assert_array_equal(handle.src_info[r, e, :len(senders)], [s * M + t for s, t in senders])
    assert (handle.src_info[r, e, len(senders):] == -1).all() and not values[r, e, len(senders):].any()
    for s in range(RANKS):
      first, rows = handle.layout_range[r, e, s]
      assert rows == sum(1 for j, _ in senders if j == s)
      block = values[r, e, first:first + rows]
      # A constant 128-column tile quantizes to 448 times an f32 scale: exact but for the scale's rounding.
      np.testing.assert_allclose(block[:, :128], s - 128.0, rtol=1e-6)
      tokens = np.asarray([t for j, t in senders if j == s], np.float32)
      np.testing.assert_allclose(block[:, -128:], np.broadcast_to(tokens[:, None], (rows, 128)), rtol=1e-6)
  assert (count.reshape(-1)[3] == 0)  # expert 3 received nothing
  # The combine is weighted: x times the sum of the valid weights (DeepEP: calc_diff < 9e-4 FP8, 1e-5 BF16).
  factor = (np.asarray(weights) * (topk_np >= 0) * (1 + topk_np / 16)).sum(-1)
  want = np.asarray(x, np.float32) * factor[..., None]
  assert fp8.calc_diff(jnp.asarray(out, jnp.float32), jnp.asarray(want)) < (9e-4 if use_fp8 else 1e-5)
  assert not np.isnan(np.asarray(out, np.float32)).any()


def test_masked_layout_feeds_the_masked_grouped_gemm():
  x, topk, weights, _ = _problem(2)
  n = 128
  w = jax.random.normal(jax.random.key(3), (E, n, H), jnp.float32) / 16
  w_fp8 = fp8.quantize_per_block(w)

  def fn(x, topk):  # the weights are the same on every rank (closed over)
    (data, scales), count, _ = ep.low_latency_dispatch(x, topk, num_max_dispatch_tokens_per_rank=M, num_experts=E)
    local = jax.lax.axis_index("ep") * (E // RANKS)
    got = fp8.m_grouped_gemm_nt_masked((data, scales), jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, local, E // RANKS), w_fp8), count, expected_m=M)
    want = jnp.einsum("erh,enh->ern", fp8.dequantize(data, scales),
                      jax.lax.dynamic_slice_in_dim(w, local, E // RANKS))
    valid = jnp.arange(RANKS * M)[None, :, None] < count[:, None, None]
    return got.astype(jnp.float32), jnp.where(valid, want, 0.0)

  got, want = helpers.run(fn, x, topk)
  assert fp8.calc_diff(jnp.asarray(got), jnp.asarray(want)) < 1e-3


def test_bad_input_names_the_argument():
  x, topk, weights, _ = _problem(4)
  with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
    helpers.run(lambda x, t: ep.low_latency_dispatch(x, t, num_max_dispatch_tokens_per_rank=T - 1, num_experts=E),
                x, topk)
  with pytest.raises(ValueError, match="multiple of 128"):
    helpers.run(lambda x, t: ep.low_latency_dispatch(x[:, :100], t, num_max_dispatch_tokens_per_rank=M,
                                                     num_experts=E), x, topk)
