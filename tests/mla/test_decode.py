"""The shared suite of `flash_mla_with_kvcache`, run against every registered implementation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla
from tests.mla import cases

IMPLS = cases.implementations()


def decode(problem, *args, **kwargs):
  """Calls the op; a backend that declares a case out of its scope (NotImplementedError) is skipped, with why."""
  try:
    return mla.flash_mla_with_kvcache(*problem, *args, **kwargs)
  except NotImplementedError as err:
    pytest.skip(f"{kwargs.get('implementation')} does not support this case: {err}")


# FlashMLA's sweep at CPU sizes: every s_q x head layout (MQA and GQA), with b, causal, varlen
# and the SM count rotating so that each value meets the others. Few SMs make long pieces of
# uneven length (the scheduler's splits mid-request); 132 makes many one-block pieces.
HEADS = [(1, 1), (3, 1), (16, 1), (64, 2), (128, 1), (16, 2)]
SWEEP = [((1, 2, 6)[i % 3], seq_q, heads_q, heads_k, i % 2 == 0, (i // 2) % 2 == 0, (132, 7, 3, 2)[i % 4])
         for i, (seq_q, (heads_q, heads_k)) in enumerate((s, h) for s in (1, 2, 4) for h in HEADS)]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("batch,seq_q,heads_q,heads_k,causal,varlen,num_sms", SWEEP)
def test_matches_dense_oracle(implementation, batch, seq_q, heads_q, heads_k, causal, varlen, num_sms):
  seqlens = cases.lengths(batch * 10 + seq_q, batch, 150, varlen)
  problem = cases.make_problem(batch + seq_q + heads_q, seqlens, seq_q, heads_q, heads_k)
  out, lse = decode(problem, cases.D_V, *cases.metadata(problem, num_sms=num_sms), causal=causal,
                    implementation=implementation)
  assert out.dtype == jnp.bfloat16 and out.shape == (batch, seq_q, heads_q, cases.D_V)
  assert lse.dtype == jnp.float32 and lse.shape == (batch, heads_q, seq_q)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=causal))


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("seed", range(4))
def test_random_lengths_and_partitions(implementation, seed):
  """Seeded fuzz: uneven multi-block pieces catch off-by-one block ranges that one-block pieces hide."""
  rng = np.random.default_rng(seed)
  batch = int(rng.integers(1, 5))
  seqlens = rng.integers(0, 700, batch)
  seqlens[rng.random(batch) < 0.2] = 0
  seq_q, (heads_q, heads_k) = int(rng.choice([1, 2, 4])), HEADS[int(rng.integers(len(HEADS)))]
  problem = cases.make_problem(100 + seed, seqlens, seq_q, heads_q, heads_k)
  num_sms = int(rng.choice([2, 3, 5, 11]))
  out, lse = decode(problem, cases.D_V, *cases.metadata(problem, num_sms=num_sms), causal=True,
                    implementation=implementation)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=True))


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("seqlens", [[0], [0, 0, 0], [0, 1, 64, 65, 0, 300], [1, 2, 3]])
def test_zero_and_tiny_lengths(implementation, seqlens):
  """Length 0 gives out = 0 and lse = +inf; causal MTP rows before the first key get the same."""
  problem = cases.make_problem(len(seqlens), seqlens, 4, 16, 1)
  out, lse = decode(problem, cases.D_V, *cases.metadata(problem), causal=True, implementation=implementation)
  want_out, want_lse = cases.oracle(problem, causal=True)
  cases.assert_matches_oracle(out, lse, want_out, want_lse)
  for r, length in enumerate(seqlens):
    if length == 0:
      assert not np.asarray(out[r], np.float32).any() and np.isposinf(np.asarray(lse[r])).all()
  if seqlens == [1, 2, 3]:  # query 0 of request 0 (length 1, s_q 4) sees nothing
    assert np.isposinf(np.asarray(lse[0, :, 0])).all() and np.isfinite(np.asarray(lse[0, :, 3])).all()


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("num_sms", [1, 7, 132, 1000])
def test_any_partitioning_gives_the_same_answer(implementation, num_sms):
  """One partition (no splits) to far more partitions than blocks (many one-block splits)."""
  problem = cases.make_problem(5, [333, 64, 0, 129], 2, 16, 1)
  out, lse = decode(problem, cases.D_V, *cases.metadata(problem, num_sms=num_sms), causal=True,
                    implementation=implementation)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=True))


@pytest.mark.parametrize("implementation", IMPLS)
def test_float16_small_head_dims_and_scale(implementation):
  """FlashMLA's other dtype, a non-MLA head size (d_qk 64, d_v 32), and an explicit softmax_scale."""
  problem = cases.make_problem(6, [70, 200], 2, 4, 2, dim=64, dtype=jnp.float16)
  meta = cases.metadata(problem)
  out, lse = decode(problem, 32, *meta, softmax_scale=0.3, causal=True, implementation=implementation)
  want = mla.dense_decode(*problem, head_dim_v=32, softmax_scale=0.3, causal=True, is_fp8_kvcache=False)
  assert out.dtype == jnp.float16
  cases.assert_matches_oracle(out, lse, *want)


@pytest.mark.parametrize("implementation", IMPLS)
def test_one_jit_per_decode_step_with_traced_lengths(implementation):
  problem = cases.make_problem(7, [100, 260, 5], 1, 16, 1, spare_blocks=2)

  @jax.jit
  def step(q, k_cache, block_table, cache_seqlens):
    meta = mla.get_mla_metadata(cache_seqlens, 16, 1)
    return mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, cases.D_V, *meta,
                                      implementation=implementation)

  cases.assert_matches_oracle(*step(*problem), *cases.oracle(problem, causal=False))
  grown = problem._replace(cache_seqlens=problem.cache_seqlens.at[2].set(0))  # same shapes, new lengths
  cases.assert_matches_oracle(*step(*grown), *cases.oracle(grown, causal=False))


@pytest.mark.parametrize("implementation", IMPLS)
def test_stale_metadata_is_nan_not_a_wrong_answer(implementation):
  problem = cases.make_problem(8, [300, 300], 1, 16, 1, spare_blocks=3)
  stale = cases.metadata(problem)
  longer = problem._replace(cache_seqlens=jnp.array([300, 400], jnp.int32))
  out, lse = jax.jit(functools.partial(mla.flash_mla_with_kvcache, implementation=implementation),
                     static_argnums=4)(*longer, cases.D_V, *stale)
  assert np.isnan(np.asarray(out[1], np.float32)).all() and np.isnan(np.asarray(lse[1])).all()


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("seq_q,heads_q,causal", [(1, 16, False), (2, 128, True), (4, 3, True)])
def test_fp8_kv_cache(implementation, seq_q, heads_q, causal):
  problem = cases.make_problem(9 + seq_q, [0, 90, 257], seq_q, heads_q, 1)
  packed = mla.quantize_kv_cache(problem.k_cache)
  meta = cases.metadata(problem)
  out, lse = decode(problem._replace(k_cache=packed), cases.D_V, *meta, causal=causal, is_fp8_kvcache=True,
                    implementation=implementation)
  # Exact against the oracle on the same FP8 cache ...
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=causal, k_cache=packed, is_fp8_kvcache=True))
  # ... and close to the bf16 cache: e4m3 keeps 3 mantissa bits (about 2**-5 relative rms per value,
  # averaged down over keys). Measured: cos-diff ~3.5e-4 and |lse error| ~1e-4; the bounds allow ~3x.
  want_out, want_lse = cases.oracle(problem, causal=causal)
  finite = np.isfinite(np.asarray(want_lse))
  assert cases.cos_diff(np.asarray(out, np.float32), np.asarray(want_out, np.float32)) < 1e-3
  assert np.abs(np.asarray(lse)[finite] - np.asarray(want_lse)[finite]).max() < 5e-4


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("num_sms", [1, 132])
def test_nan_inside_the_length_stays_loud(implementation, num_sms):
  """A NaN in a cached token that is visible must reach out and lse, never pass as "no keys"."""
  problem = cases.make_problem(11, [256, 100], 1, 16, 1)
  page = int(problem.block_table[0, 2])
  poisoned = problem._replace(k_cache=problem.k_cache.at[page, 5].set(jnp.nan))
  out, lse = decode(poisoned, cases.D_V, *cases.metadata(poisoned, num_sms=num_sms),
                    implementation=implementation)
  assert np.isnan(np.asarray(lse[0])).all() and np.isnan(np.asarray(out[0], np.float32)).all()
  assert np.isfinite(np.asarray(lse[1])).all()
  want_out, want_lse = cases.oracle(poisoned, causal=False)
  assert np.isnan(np.asarray(want_lse[0])).all() and np.isnan(np.asarray(want_out[0], np.float32)).all()


@pytest.mark.parametrize("implementation", IMPLS)
def test_vmap_over_independent_caches(implementation):
  problems = [cases.make_problem(seed, [70, 200], 2, 16, 1) for seed in (20, 21)]
  metas = [cases.metadata(p) for p in problems]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
  meta, splits = (jnp.stack(xs) for xs in zip(*metas))
  out, lse = jax.vmap(lambda *a: mla.flash_mla_with_kvcache(*a[:4], cases.D_V, *a[4:], causal=True,
                                                            implementation=implementation))(*stacked, meta, splits)
  for i, problem in enumerate(problems):
    cases.assert_matches_oracle(out[i], lse[i], *cases.oracle(problem, causal=True))


# ---- real shapes, on a GPU: FlashMLA's performance cases ----

@pytest.mark.gpu
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("seq_q", [1, 2])
@pytest.mark.parametrize("heads_q", [16, 64, 128])
@pytest.mark.parametrize("mean_len", [4096, 8192])
def test_flashmla_shapes(implementation, seq_q, heads_q, mean_len):
  seqlens = cases.lengths(seq_q + heads_q, 16, mean_len, varlen=True)  # b=128 in FlashMLA; the oracle bounds it here
  problem = cases.make_problem(mean_len, np.maximum(seqlens, seq_q), seq_q, heads_q, 1)
  out, lse = mla.flash_mla_with_kvcache(*problem, cases.D_V, *cases.metadata(problem), causal=True,
                                        implementation=implementation)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=True))
