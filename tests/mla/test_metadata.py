"""The scheduler against FlashMLA's loop written plainly, its invariants, and the combine math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mla
from mla import metadata as meta
from tests.mla.scheduler_oracle import schedule


@given(st.lists(st.integers(0, 2000), min_size=1, max_size=40), st.sampled_from([1, 3, 16, 64, 128, 512]),
       st.sampled_from([1, 2, 8]), st.sampled_from([1, 20, 78, 132]))
def test_matches_flashmla_loop(seqlens, rows, heads_k, num_sms):
  parts = mla.get_num_sm_parts(rows, heads_k, num_sms)
  got_meta, got_splits = mla.get_mla_metadata(jnp.array(seqlens, jnp.int32), rows, heads_k, num_sms=num_sms)
  want_meta, want_splits = schedule(seqlens, parts)
  np.testing.assert_array_equal(np.asarray(got_meta), want_meta)
  np.testing.assert_array_equal(np.asarray(got_splits), want_splits)


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=64), st.sampled_from([1, 9, 66, 132]))
def test_every_block_is_covered_exactly_once(seqlens, num_parts):
  rows, splits = schedule(seqlens, num_parts)  # the oracle asserts that the payload suffices
  got_rows, got_splits = mla.get_mla_metadata(jnp.array(seqlens, jnp.int32), 64, 1,
                                              num_sms=num_parts)
  np.testing.assert_array_equal(np.asarray(got_rows), rows)
  covered = [np.zeros(-(-s // 64), int) for s in seqlens]
  pieces = np.zeros(len(seqlens), int)
  for row in np.asarray(got_rows):
    for r in range(row[meta.BEGIN_REQ], row[meta.END_REQ] + 1):
      first = row[meta.BEGIN_BLOCK] if r == row[meta.BEGIN_REQ] else 0
      last = row[meta.END_BLOCK] if r == row[meta.END_REQ] else len(covered[r])
      covered[r][first:last] += 1
      pieces[r] += 1
  assert all((c == 1).all() for c in covered)
  np.testing.assert_array_equal(np.asarray(got_splits), np.concatenate([[0], np.cumsum(pieces)]))
  assert int(got_splits[-1]) <= len(seqlens) + num_parts - 1  # FlashMLA's o_accum bound


def test_num_sm_parts_formula():
  assert mla.get_num_sm_parts(128, 1) == 66  # h_q = 128, s_q = 1 on 132 SMs: FlashMLA's example
  assert mla.get_num_sm_parts(16, 1) == 132
  assert mla.get_num_sm_parts(512, 2) == 8
  assert mla.get_num_sm_parts(64 * 200, 1) == 1


def test_jit_with_traced_lengths():
  plan = jax.jit(lambda lens: mla.get_mla_metadata(lens, 128, 1))
  for seqlens in ([5, 4000, 0, 77], [64, 64, 64, 64]):
    got = plan(jnp.array(seqlens, jnp.int32))
    want = schedule(seqlens, 66)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])


def test_combine_matches_one_softmax():
  """Splitting a softmax over key ranges and combining by lse equals the softmax over all keys."""
  rng = np.random.default_rng(0)
  scores, values = rng.normal(size=(3, 10)), rng.normal(size=(10, 4))
  bounds = [[0, 3, 10], [0, 10], [0, 1, 2, 10]]
  o_parts, lse_parts, counts = [], [], []
  for r, cuts in enumerate(bounds):
    for a, b in zip(cuts[:-1], cuts[1:]):
      s = scores[r, a:b]
      lse = np.log(np.exp(s).sum())
      o_parts.append(np.exp(s - lse) @ values[a:b])
      lse_parts.append(lse)
    counts.append(len(cuts) - 1)
  o_parts.append(np.full(4, np.nan))  # an unused slot: never read
  lse_parts.append(np.nan)
  num_splits = jnp.array(np.concatenate([[0], np.cumsum(counts)]), jnp.int32)
  out, lse = mla.combine_splits(jnp.array(o_parts, jnp.float32), jnp.array(lse_parts, jnp.float32), num_splits)
  full_lse = np.log(np.exp(scores).sum(-1))
  np.testing.assert_allclose(np.asarray(lse), full_lse, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.exp(scores - full_lse[:, None]) @ values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: mla.get_mla_metadata(jnp.zeros(2, jnp.float32), 1, 1), "cache_seqlens must be a 1-D int32"),
    (lambda: mla.get_mla_metadata(jnp.zeros((2, 2), jnp.int32), 1, 1), "cache_seqlens must be a 1-D int32"),
    (lambda: mla.get_mla_metadata(jnp.zeros(0, jnp.int32), 1, 1), "at least one request"),
    (lambda: mla.get_mla_metadata(jnp.zeros(2, jnp.int32), 0, 1), "num_q_tokens_per_head_k"),
    (lambda: mla.get_mla_metadata(jnp.zeros(2, jnp.int32), 1, 1.5), "num_heads_k"),
    (lambda: mla.get_mla_metadata(jnp.zeros(2, jnp.int32), 1, 1, num_sms=0), "num_sms"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_data_parallel_decode_under_shard_map():
  """Each rank schedules and attends over its own requests (serving's data-parallel attention): the loops' carries vary over the mesh axis."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("dp",), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  seqlens = np.array([70, 5, 130, 64], np.int32)
  q = jnp.asarray(rng.standard_normal((4, 1, 4, 64)), jnp.bfloat16)
  k_cache = jnp.asarray(rng.standard_normal((2, 8, 64, 1, 64)), jnp.bfloat16)  # [ranks, pages, 64, 1, d]
  tables = np.array([[1, 2, 0], [3, 0, 0], [1, 2, 3], [4, 0, 0]], np.int32)

  def local(q, k_cache, tables, seqlens):
    metadata, splits = mla.get_mla_metadata(seqlens, 4, 1)
    out, _ = mla.flash_mla_with_kvcache(q, k_cache[0], tables, seqlens, 32, metadata, splits)
    return out

  put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("dp")))
  got = np.asarray(jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("dp"), out_specs=P("dp")))(
      put(q), put(k_cache), put(tables), put(seqlens)), np.float32)
  for rank in range(2):  # the same requests, one rank at a time, outside shard_map
    rows = slice(2 * rank, 2 * rank + 2)
    want = local(q[rows], k_cache[rank:rank + 1], tables[rows], jnp.asarray(seqlens[rows]))
    np.testing.assert_array_equal(got[rows], np.asarray(want, np.float32))
