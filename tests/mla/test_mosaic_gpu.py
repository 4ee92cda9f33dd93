"""The Hopper decode kernel (`implementation="mosaic_gpu"`) on CPU, in Mosaic GPU interpret mode.

The shared suite (test_decode.py) runs it natively under `gpu`; here it runs its exact code in
the interpreter at small sizes (b <= 4, lengths <= 300, h_q <= 32), on FlashMLA-style problems:
pages past each length are NaN and block-table entries past it are 2147480000, so any read past
a length shows (in the FP8 cache, those tokens' values and scales are NaN bytes). Each case
checks the kernel against the dense oracle. Plus: race detection (the interpreter does not
race-check wgmma's shared-memory reads, so the consumers' barriers around the FP8 tile are
checked only on a GPU), lowering for CUDA from this host, and the cases it leaves to xla.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla
from backends import mosaic_interpret
from tests.mla import cases


def _decode(problem, num_sms, causal, **kwargs):
  return mla.flash_mla_with_kvcache(*problem, cases.D_V, *cases.metadata(problem, num_sms=num_sms), causal=causal,
                                    **kwargs)


@pytest.mark.parametrize("seqlens, seq_q, heads_q, heads_k, causal, num_sms", [
    ([150, 0, 70], 1, 16, 1, False, 3),  # varlen with an empty request, pieces split mid-request
    ([300, 5], 2, 16, 1, True, 5),  # causal MTP, a one-block request
    ([100, 64], 2, 8, 2, True, 2),  # GQA: two KV heads, a page-aligned length
    ([30], 4, 32, 1, False, 7),  # 128 rows: two M tiles
])
def test_matches_the_dense_oracle_in_interpret_mode(seqlens, seq_q, heads_q, heads_k, causal, num_sms):
  problem = cases.make_problem(sum(seqlens) + heads_q, seqlens, seq_q, heads_q, heads_k)
  out, lse = _decode(problem, num_sms, causal, implementation="mosaic_gpu", interpret=True)
  assert out.dtype == jnp.bfloat16 and out.shape == (len(seqlens), seq_q, heads_q, cases.D_V)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=causal))


def _poisoned_fp8(problem):
  """The FP8 cache of a problem, every byte of every token past its length 0xFF (NaN values, scales, RoPE)."""
  packed = mla.quantize_kv_cache(jnp.nan_to_num(problem.k_cache))
  past_length = jnp.isnan(problem.k_cache[..., :1].astype(jnp.float32))  # make_problem's NaN tokens
  return jnp.where(past_length, jnp.uint8(0xFF), packed)


@pytest.mark.parametrize("seqlens, seq_q, heads_q, heads_k, causal, num_sms, as_float8", [
    ([100, 0, 70], 2, 16, 1, True, 3, False),  # causal MTP, an empty request, a split request
    ([130], 1, 4, 1, False, 2, True),  # FlashMLA's float8 view of the bytes; a 2-token last page
    ([130, 70], 2, 8, 2, True, 3, False),  # two KV heads: each head's values, scales and RoPE offsets
])
def test_fp8_cache_matches_the_dense_oracle_in_interpret_mode(seqlens, seq_q, heads_q, heads_k, causal, num_sms,
                                                              as_float8):
  problem = cases.make_problem(11 + seq_q, seqlens, seq_q, heads_q, heads_k)
  packed = _poisoned_fp8(problem)
  cache = jax.lax.bitcast_convert_type(packed, jnp.float8_e4m3fn) if as_float8 else packed
  out, lse = _decode(problem._replace(k_cache=cache), num_sms, causal, is_fp8_kvcache=True,
                     implementation="mosaic_gpu", interpret=True)
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=causal, k_cache=packed, is_fp8_kvcache=True))


@pytest.mark.parametrize("fp8", [False, True])
def test_no_races(monkeypatch, fp8):
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  monkeypatch.setattr(mosaic_interpret, "DETECT_RACES", True)
  problem = cases.make_problem(7, [100, 20], 1, 16, 1)
  cache = _poisoned_fp8(problem) if fp8 else problem.k_cache
  out, lse = _decode(problem._replace(k_cache=cache), 2, False, is_fp8_kvcache=fp8, implementation="mosaic_gpu",
                     interpret=True)
  assert not get_races().races_found
  cases.assert_matches_oracle(out, lse, *cases.oracle(problem, causal=False, k_cache=cache, is_fp8_kvcache=fp8))


@pytest.mark.parametrize("fp8", [False, True])
def test_lowers_for_cuda_from_this_host(monkeypatch, fp8):
  from mla import mosaic_gpu
  monkeypatch.setattr(mosaic_gpu, "_check_device", lambda interpret: None)  # build for sm90 on this host
  problem = cases.make_problem(8, [150, 70], 2, 16, 1)
  md = cases.metadata(problem)
  cache = mla.quantize_kv_cache(problem.k_cache) if fp8 else problem.k_cache
  call = jax.jit(lambda q, k, t, s, m, n: mla.flash_mla_with_kvcache(q, k, t, s, cases.D_V, m, n, causal=True,
                                                                     is_fp8_kvcache=fp8, implementation="mosaic_gpu"))
  lowered = call.trace(problem.q, cache, *problem[2:], *md).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_what_it_leaves_to_xla():
  problem = cases.make_problem(9, [70], 1, 16, 1)
  with pytest.raises(NotImplementedError, match="bf16"):
    _decode(problem._replace(q=problem.q.astype(jnp.float16), k_cache=problem.k_cache.astype(jnp.float16)), 1,
            False, implementation="mosaic_gpu", interpret=True)
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="interpret=True"):
      _decode(problem, 132, False, implementation="mosaic_gpu")
    out, _ = _decode(problem, 132, False)  # None: xla here
    assert not np.isnan(np.asarray(out, np.float32)).any()


def test_the_combine_kernel_matches_the_xla_combine():
  from mla import combine, mosaic_combine
  slots, heads_k, rows_pad, dim_v = 5, 2, 64, 256
  num_splits = jnp.array([0, 2, 2, 5], jnp.int32)  # request 1 has no partials: out 0, lse +inf
  o = jax.random.normal(jax.random.key(0), (slots * heads_k * rows_pad, dim_v), jnp.float32)
  lse = jax.random.normal(jax.random.key(1), (slots * heads_k * rows_pad,), jnp.float32)
  lse = lse.at[3 * heads_k * rows_pad:3 * heads_k * rows_pad + 10].set(-jnp.inf)  # partials that saw no key
  lse = lse.at[:rows_pad].set(-jnp.inf).at[heads_k * rows_pad:(heads_k + 1) * rows_pad].set(-jnp.inf)  # nor any of r0's
  out, merged = mosaic_combine.combine(o, lse, num_splits, batch=3, heads_k=heads_k, rows_pad=rows_pad,
                                       out_dtype=jnp.float32, interpret=True)
  want_out, want_lse = combine.combine_splits(o.reshape(slots, heads_k, rows_pad, dim_v),
                                              lse.reshape(slots, heads_k, rows_pad), num_splits)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out).reshape(-1, dim_v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(want_lse).reshape(-1), rtol=1e-5)
  assert np.isinf(np.asarray(merged).reshape(3, heads_k, rows_pad)[0, 0]).all()
  assert not np.asarray(out).reshape(3, heads_k, rows_pad, dim_v)[1].any()


def test_stale_metadata_gives_nan_not_an_out_of_bounds_read():
  problem = cases.make_problem(10, [70, 130], 1, 16, 1)
  stale = mla.get_mla_metadata(jnp.array([200, 300], jnp.int32), 16, 1, num_sms=3)  # other, longer lengths
  out, _ = mla.flash_mla_with_kvcache(*problem, cases.D_V, *stale, implementation="mosaic_gpu", interpret=True)
  assert np.isnan(np.asarray(out, np.float32)).all(axis=(1, 2, 3)).any()
