"""Normal-mode dispatch and combine on 8 CPU devices, DeepEP's checks with (rank, token)-encoded rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import expert_parallel as ep
import fp8
from tests.expert_parallel import helpers
from tests.expert_parallel.helpers import RANKS
from jax.sharding import NamedSharding, PartitionSpec as P

T, K, E, H = 12, 4, 32, 128
CPU_IMPLS = ["xla", "ffi"]


def _dispatch(impl, capacity=None, alignment=1, with_combine=False):
  def fn(x, topk, w):
    res, handle = ep.dispatch(x, topk, w, num_experts=E, capacity=capacity, expert_alignment=alignment,
                              implementation=impl)
    rows = jnp.where((jnp.arange(res.x.shape[0]) < res.num_valid)[:, None], res.x.astype(jnp.float32), jnp.nan)
    out = ep.combine(rows, handle, implementation=impl) if with_combine else None  # NaN rows must be ignored
    return res._replace(x_scales=None), out
  return fn


def test_layout_matches_a_naive_recount():
  topk = helpers.routing(0, T, K, E, empty_slots=9)[0]
  layout = ep.get_dispatch_layout(jnp.asarray(topk), num_experts=E, num_ranks=RANKS)
  per_rank = E // RANKS
  in_rank = np.zeros((T, RANKS), bool)
  per_expert = np.zeros(E, np.int32)
  for t, k in np.ndindex(T, K):
    if topk[t, k] >= 0:
      in_rank[t, topk[t, k] // per_rank] = True
      per_expert[topk[t, k]] += 1
  np.testing.assert_array_equal(np.asarray(layout.is_token_in_rank), in_rank)
  np.testing.assert_array_equal(np.asarray(layout.num_tokens_per_rank), in_rank.sum(0))
  np.testing.assert_array_equal(np.asarray(layout.num_tokens_per_expert), per_expert)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_received_blocks_local_ids_counts_and_combine(impl):
  topk = helpers.routing(1, T, K, E, empty_slots=20, skip_expert=5)  # expert 5 receives nothing
  x = helpers.encoded_x(T, H)
  w = np.random.default_rng(1).random((RANKS, T, K)).astype(np.float32)
  res, back = helpers.run(_dispatch(impl, alignment=4, with_combine=True), x, jnp.asarray(topk), jnp.asarray(w))
  per_rank = E // RANKS
  x32 = np.asarray(x, np.float32)
  for r in range(RANKS):
    rows = helpers.expected_rows(topk, E, r)
    n = len(rows)
    assert res.num_valid[r] == n and res.num_dropped[r] == 0
    np.testing.assert_array_equal(res.src_rank[r, :n], [s for s, _ in rows])
    np.testing.assert_array_equal(res.src_token[r, :n], [t for _, t in rows])
    np.testing.assert_array_equal(np.asarray(res.x[r, :n], np.float32), np.stack([x32[s, t] for s, t in rows]))
    assert not np.asarray(res.x[r, n:], np.float32).any() and (res.src_rank[r, n:] == -1).all()
    local = np.stack([np.where(topk[s, t] // per_rank == r, topk[s, t] - r * per_rank, -1) for s, t in rows])
    local[np.stack([topk[s, t] for s, t in rows]) < 0] = -1
    np.testing.assert_array_equal(res.topk_idx[r, :n], local)
    assert (res.topk_idx[r, n:] == -1).all()
    want_w = np.stack([w[s, t] for s, t in rows]) * (local >= 0)
    np.testing.assert_array_equal(res.topk_weights[r, :n], want_w)
    counts = np.bincount(local[local >= 0], minlength=per_rank)
    np.testing.assert_array_equal(res.num_tokens_per_expert[r], -(-counts // 4) * 4)
  assert res.num_tokens_per_expert[1][1] == 0  # expert 5 is rank 1's local expert 1
  # Combine after dispatch: x times the number of ranks each token went to (DeepEP's check).
  reached = helpers.ranks_reached(topk, E)
  np.testing.assert_allclose(back, x32 * reached[..., None], rtol=1e-6)


def test_implementations_agree_bitwise():
  topk = jnp.asarray(helpers.routing(2, T, K, E, empty_slots=5))
  x = helpers.encoded_x(T, H, seed=2)
  w = jnp.ones((RANKS, T, K), jnp.float32)
  outs = [helpers.run(_dispatch(impl, capacity=40, with_combine=True), x, topk, w) for impl in CPU_IMPLS]
  jax.tree.map(np.testing.assert_array_equal, *outs)


def test_capacity_overflow_is_counted_and_the_first_rows_are_kept():
  topk = helpers.routing(3, T, K, E)
  x = helpers.encoded_x(T, H, seed=3)
  capacity = 20
  res, back = helpers.run(_dispatch("xla", capacity=capacity, with_combine=True), x, jnp.asarray(topk),
                          jnp.ones((RANKS, T, K), jnp.float32))
  assert res.x.shape[1] == capacity
  kept = np.zeros((RANKS, T), np.int32)
  for r in range(RANKS):
    rows = helpers.expected_rows(topk, E, r)
    assert res.num_valid[r] == min(len(rows), capacity)
    assert res.num_dropped[r] == max(len(rows) - capacity, 0)
    np.testing.assert_array_equal(res.src_token[r, :capacity], [t for _, t in rows[:capacity]])
    for s, t in rows[:capacity]:
      kept[s, t] += 1
  assert res.num_dropped.sum() > 0
  # A dropped copy contributes nothing to the combine; the kept ones still add up.
  np.testing.assert_allclose(back, np.asarray(x, np.float32) * kept[..., None], rtol=1e-6)


def test_fp8_dispatch_carries_the_scales():
  topk = jnp.asarray(helpers.routing(4, T, K, E, empty_slots=4))
  x = helpers.encoded_x(T, H, dtype=jnp.float32, seed=4)

  def fn(x, topk, w):
    res, _ = ep.dispatch(fp8.quantize_per_token(x), topk, w, num_experts=E)
    bf16, _ = ep.dispatch(x.astype(jnp.bfloat16), topk, w, num_experts=E)
    return fp8.dequantize(res.x, res.x_scales), bf16.x, res.num_valid

  deq, ref, num_valid = helpers.run(fn, x, topk, jnp.ones((RANKS, T, K), jnp.float32))
  for r in range(RANKS):
    n = num_valid[r]
    assert fp8.calc_diff(jnp.asarray(deq[r, :n]), jnp.asarray(ref[r, :n], np.float32)) < 1e-3
    assert not deq[r, n:].any()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradients_are_combines_and_dispatches(impl):
  topk = helpers.routing(5, T, K, E, empty_slots=6)
  x = helpers.encoded_x(T, H, dtype=jnp.float32, seed=5)
  w = np.random.default_rng(5).random((RANKS, T, K)).astype(np.float32)
  c = np.asarray(jax.random.normal(jax.random.key(6), (RANKS, T, H)), np.float32)

  def fn(x, topk, w, c):
    def loss(x, w):
      res, handle = ep.dispatch(x, topk, w, num_experts=E, implementation=impl)
      out = ep.combine(res.x * 2.0, handle, topk_weights=res.topk_weights, implementation=impl)
      return (out * c).sum()
    return jax.grad(loss, argnums=(0, 1))(x, w)

  gx, gw = helpers.run(fn, x, jnp.asarray(topk), jnp.asarray(w), jnp.asarray(c))
  # out[t] = 2 x[t] * sum of t's valid weights (each expert's weight counted on its own rank).
  valid = topk >= 0
  np.testing.assert_allclose(gx, 2 * c * (w * valid).sum(-1)[..., None], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, 2 * (c * np.asarray(x)).sum(-1)[..., None] * valid, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_dispatch_and_combine_are_adjoint_with_drops(impl):
  """<dispatch(x), r> = <x, combine(r)>: the custom VJPs (each the other's transpose) hold with drops too."""
  topk = jnp.asarray(helpers.routing(10, T, K, E, empty_slots=7))
  x = helpers.encoded_x(T, H, dtype=jnp.float32, seed=10)
  capacity = 7
  r = jax.random.normal(jax.random.key(11), (RANKS, capacity, H), jnp.float32)

  def fn(x, topk, r):
    res, handle = ep.dispatch(x, topk, jnp.ones(topk.shape, jnp.float32), num_experts=E, capacity=capacity,
                              implementation=impl)
    back = ep.combine(r, handle, implementation=impl)
    grad = jax.grad(lambda x: (ep.dispatch(x, topk, jnp.ones(topk.shape, jnp.float32), num_experts=E,
                                           capacity=capacity, implementation=impl)[0].x * r).sum())(x)
    return (res.x * r).sum()[None], (x * back).sum()[None], grad, back, res.num_dropped[None]

  forward, adjoint, grad, back, dropped = helpers.run(fn, x, topk, r)
  assert dropped.sum() > 0
  np.testing.assert_allclose(forward.sum(), adjoint.sum(), rtol=1e-5)
  np.testing.assert_allclose(grad, back, rtol=1e-6)  # the backward of dispatch is the combine


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, axis_index_groups=None):
  """JAX's documented ragged_all_to_all, from all_gathers (XLA:CPU has no kernel for it).

  Source s writes rows `operand_s[input_offsets_s[d] : + send_sizes_s[d]]` into destination d's
  output at `output_offsets_s[d]` (an offset in the receiver's buffer, given by the sender).
  recv_sizes must agree with what the sources send; if not, the result is made wrong on purpose.
  """
  del axis_index_groups
  me = jax.lax.axis_index(axis_name)
  rows = jax.lax.all_gather(operand, axis_name)
  starts = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  sources = jax.lax.all_gather(input_offsets, axis_name)[:, me]
  i = jnp.arange(output.shape[0])
  inside = (i[None] >= starts[:, None]) & (i[None] < (starts + sizes)[:, None])
  source = jnp.argmax(inside, axis=0)
  row = jnp.clip(sources[source] + i - starts[source], 0, operand.shape[0] - 1)
  result = jnp.where(inside.any(0).reshape(-1, *([1] * (output.ndim - 1))), rows[source, row], output)
  return jnp.where((recv_sizes != sizes).any(), jnp.full_like(result, 7), result)


def test_ragged_arguments_match_xla_through_an_emulated_collective(monkeypatch):
  from expert_parallel import transport
  monkeypatch.setitem(transport.PLATFORMS, "ragged", ("cpu", "gpu"))
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  topk = jnp.asarray(helpers.routing(12, T, K, E, empty_slots=9))
  x = helpers.encoded_x(T, H, dtype=jnp.float32, seed=12)
  w = jnp.ones((RANKS, T, K), jnp.float32)
  for capacity in (None, 9):
    ragged, xla = (helpers.run(_dispatch(impl, capacity=capacity, with_combine=True), x, topk, w)
                   for impl in ("ragged", "xla"))
    jax.tree.map(np.testing.assert_array_equal, ragged, xla)


def test_ragged_lowers_for_gpu_from_this_host(monkeypatch):
  from expert_parallel import transport
  monkeypatch.setitem(transport.PLATFORMS, "ragged", ("cpu", "gpu"))  # build the GPU program on this host
  mesh = helpers.mesh()

  def per_rank(x, topk, w):
    res, handle = ep.dispatch(x[0], topk[0], w[0], num_experts=E, implementation="ragged")
    return ep.combine(res.x, handle, implementation="ragged")[None]

  call = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  args = (jax.ShapeDtypeStruct((RANKS, T, H), jnp.bfloat16, sharding=NamedSharding(mesh, P("ep"))),
          jax.ShapeDtypeStruct((RANKS, T, K), jnp.int32, sharding=NamedSharding(mesh, P("ep"))),
          jax.ShapeDtypeStruct((RANKS, T, K), jnp.float32, sharding=NamedSharding(mesh, P("ep"))))
  text = call.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("ragged_all_to_all") >= 2  # the dispatch and the combine


def test_ragged_is_refused_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU refusal")
  with pytest.raises(NotImplementedError, match="ragged"):
    helpers.run(_dispatch("ragged"), helpers.encoded_x(T, H), jnp.asarray(helpers.routing(8, T, K, E)),
                jnp.ones((RANKS, T, K), jnp.float32))


def test_bad_input_names_the_argument():
  topk = jnp.asarray(helpers.routing(9, T, K, E))
  x, w = helpers.encoded_x(T, H), jnp.ones((RANKS, T, K), jnp.float32)
  cases = [
      (lambda x, t, w: ep.dispatch(x, t, w, num_experts=E + 1), "num_experts"),
      (lambda x, t, w: ep.dispatch(x[:3], t, w, num_experts=E), "tokens"),
      (lambda x, t, w: ep.dispatch(x, t.astype(jnp.float32), w, num_experts=E), "topk_idx"),
      (lambda x, t, w: ep.dispatch(x, t, w[:, :2], num_experts=E), "topk_weights"),
      (lambda x, t, w: ep.dispatch(x, t, w, num_experts=E, capacity=0), "capacity"),
      (lambda x, t, w: ep.dispatch(x, t, w, num_experts=E, expert_alignment=0), "expert_alignment"),
      (lambda x, t, w: ep.dispatch(x, t, w, num_experts=E, implementation="nccl"), "implementation"),
      (lambda x, t, w: ep.dispatch(x.astype(jnp.int32), t, w, num_experts=E), "x must be"),
      (lambda x, t, w: ep.dispatch(x, t, w, num_experts=E, axis_name="tp"), "axis_name"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      helpers.run(call, x, topk, w)
  with pytest.raises(ValueError, match=r"topk_idx\[0, 0\]=32"):
    ep.get_dispatch_layout(jnp.full((2, 2), E, jnp.int32), num_experts=E, num_ranks=RANKS)
