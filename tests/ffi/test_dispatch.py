"""The shared suite of the dispatch ops, run against the jnp reference and the FFI handlers.

Values are encoded with their source token (row t of x holds t + 1 in every column), so a row
that lands in the wrong place, or twice, shows exactly. The plain-numpy loops here are the
oracle for both implementations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ffi

IMPLS = ["xla", "ffi"]


def _topk(seed: int, tokens: int, topk: int, num_experts: int, none_share: float = 0.15) -> np.ndarray:
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.permutation(num_experts)[:topk] for _ in range(tokens)]) if tokens else np.zeros((0, topk))
  idx = np.where(rng.random(idx.shape) < none_share, -1, idx)
  return idx.astype(np.int32)


def _oracle_layout(idx: np.ndarray, num_experts: int, num_ranks: int):
  per_rank_experts = num_experts // num_ranks
  in_rank = np.zeros((idx.shape[0], num_ranks), bool)
  per_expert = np.zeros(num_experts, np.int32)
  for t, row in enumerate(idx):
    for e in row:
      if e >= 0:
        in_rank[t, e // per_rank_experts] = True
        per_expert[e] += 1
  return in_rank.sum(0).astype(np.int32), per_expert, in_rank


def _encoded(tokens: int, hidden: int, dtype=jnp.bfloat16) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(1, tokens + 1, dtype=jnp.float32)[:, None], (tokens, hidden)).astype(dtype)


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("tokens,topk,num_experts,num_ranks", [(1, 1, 4, 4), (37, 4, 16, 4), (256, 8, 64, 8),
                                                             (100, 6, 12, 3), (0, 2, 8, 2)])
def test_layout(implementation, tokens, topk, num_experts, num_ranks):
  idx = _topk(tokens + topk, tokens, topk, num_experts)
  got = ffi.dispatch_layout(idx, num_experts=num_experts, num_ranks=num_ranks, implementation=implementation)
  for g, w in zip(got, _oracle_layout(idx, num_experts, num_ranks)):
    np.testing.assert_array_equal(np.asarray(g), w)
  assert got.is_token_in_rank.dtype == jnp.bool_ and got.num_tokens_per_rank.dtype == jnp.int32


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("capacity", [None, 7, 0])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn])
def test_pack_routes_every_row_in_source_order(implementation, capacity, dtype):
  tokens, hidden, num_experts, num_ranks = 40, 24, 16, 4
  idx = _topk(3, tokens, 4, num_experts)
  x = _encoded(tokens, hidden, dtype) if dtype != jnp.float8_e4m3fn else _encoded(tokens, hidden).astype(dtype)
  packed = ffi.dispatch_pack(x, idx, num_experts=num_experts, num_ranks=num_ranks, capacity=capacity,
                             implementation=implementation)
  cap = tokens if capacity is None else capacity
  assert packed.buffer.shape == (num_ranks, cap, hidden) and packed.buffer.dtype == dtype
  _, _, in_rank = _oracle_layout(idx, num_experts, num_ranks)
  buffer = np.asarray(packed.buffer.astype(jnp.float32))
  for r in range(num_ranks):
    wanted = np.flatnonzero(in_rank[:, r])
    kept = wanted[:cap]
    n = len(kept)
    assert packed.counts[r] == n and packed.num_dropped[r] == len(wanted) - n
    assert packed.offsets[r] == r * cap
    np.testing.assert_array_equal(np.asarray(packed.src_idx[r, :n]), kept)
    np.testing.assert_array_equal(np.asarray(packed.src_idx[r, n:]), -1)
    np.testing.assert_array_equal(buffer[r, :n], np.asarray(x.astype(jnp.float32))[kept])
    assert not buffer[r, n:].any()


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_combine_inverts_pack(implementation, dtype):
  tokens, hidden, num_experts, num_ranks = 50, 16, 32, 8
  idx = _topk(4, tokens, 6, num_experts)
  x = jax.random.normal(jax.random.key(0), (tokens, hidden), jnp.float32).astype(dtype)
  packed = ffi.dispatch_pack(x, idx, num_experts=num_experts, num_ranks=num_ranks, implementation=implementation)
  hits = _oracle_layout(idx, num_experts, num_ranks)[2].sum(1)
  out = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=tokens, implementation=implementation)
  assert out.dtype == dtype
  want = np.asarray(x, np.float32) * hits[:, None]
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
  weights = jnp.asarray(np.random.default_rng(1).random(packed.src_idx.shape), jnp.float32)
  out = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=tokens, weights=weights,
                           implementation=implementation)
  want = np.zeros((tokens, hidden))
  src, w, rows = np.asarray(packed.src_idx), np.asarray(weights), np.asarray(packed.buffer, np.float32)
  for r in range(num_ranks):
    for i in range(src.shape[1]):
      if src[r, i] >= 0:
        want[src[r, i]] += w[r, i] * rows[r, i]
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLS)
def test_jit_and_vmap(implementation):
  idx = jnp.asarray(np.stack([_topk(s, 20, 2, 8) for s in range(3)]))
  x = _encoded(20, 8)
  pack = functools.partial(ffi.dispatch_pack, num_experts=8, num_ranks=4, capacity=6, implementation=implementation)
  mapped = jax.jit(jax.vmap(pack, in_axes=(None, 0)))(x, idx)
  for b in range(3):
    single = pack(x, idx[b])
    for g, w in zip(mapped, single):
      np.testing.assert_array_equal(np.asarray(g[b], np.float32), np.asarray(w, np.float32))
  layout = jax.jit(functools.partial(ffi.dispatch_layout, num_experts=8, num_ranks=4, implementation=implementation))
  np.testing.assert_array_equal(np.asarray(layout(idx[0]).is_token_in_rank), _oracle_layout(np.asarray(idx[0]), 8, 4)[2])


@pytest.mark.parametrize("implementation", IMPLS)
def test_under_shard_map_on_8_devices(implementation):
  """Each device packs its own tokens; the result equals packing each shard alone."""
  devices = jax.devices()[:8]
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  tokens_per_device, hidden = 12, 8
  idx = jnp.asarray(_topk(5, 8 * tokens_per_device, 3, 16))
  x = _encoded(8 * tokens_per_device, hidden, jnp.float32)

  def local(x, idx):
    packed = ffi.dispatch_pack(x, idx, num_experts=16, num_ranks=8, implementation=implementation)
    back = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=x.shape[0], implementation=implementation)
    return packed.buffer[None], packed.counts[None], back

  spec = jax.P("ep")
  buffers, counts, back = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec, spec)))(x, idx)
  for d in range(8):
    rows = slice(d * tokens_per_device, (d + 1) * tokens_per_device)
    alone = ffi.dispatch_pack(x[rows], idx[rows], num_experts=16, num_ranks=8, implementation="xla")
    np.testing.assert_array_equal(np.asarray(buffers[d]), np.asarray(alone.buffer))
    np.testing.assert_array_equal(np.asarray(counts[d]), np.asarray(alone.counts))
  hits = _oracle_layout(np.asarray(idx), 16, 8)[2].sum(1)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x) * hits[:, None])


@pytest.mark.parametrize("implementation", IMPLS)
def test_empty_tokens_and_hidden(implementation):
  for tokens, hidden in ((0, 8), (6, 0)):
    idx = _topk(1, tokens, 2, 8)
    x = jnp.zeros((tokens, hidden), jnp.bfloat16)
    packed = ffi.dispatch_pack(x, idx, num_experts=8, num_ranks=2, capacity=4, implementation=implementation)
    assert packed.buffer.shape == (2, 4, hidden)
    np.testing.assert_array_equal(np.asarray(packed.counts), _oracle_layout(idx, 8, 2)[2].sum(0).clip(max=4))
    out = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=tokens, implementation=implementation)
    assert out.shape == (tokens, hidden) and not np.asarray(out, np.float32).any()


@pytest.mark.parametrize("implementation", IMPLS)
def test_layout_under_shard_map(implementation):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("ep",))
  idx = jnp.asarray(_topk(6, 8 * 10, 4, 32))
  layout = functools.partial(ffi.dispatch_layout, num_experts=32, num_ranks=8, implementation=implementation)
  per_rank, per_expert, in_rank = jax.jit(jax.shard_map(
      lambda i: tuple(v[None] if v.ndim == 1 else v for v in layout(i)), mesh=mesh, in_specs=jax.P("ep"),
      out_specs=(jax.P("ep"), jax.P("ep"), jax.P("ep"))))(idx)
  for d in range(8):
    want = _oracle_layout(np.asarray(idx[d * 10:(d + 1) * 10]), 32, 8)
    np.testing.assert_array_equal(np.asarray(per_rank[d]), want[0])
    np.testing.assert_array_equal(np.asarray(per_expert[d]), want[1])
  np.testing.assert_array_equal(np.asarray(in_rank), _oracle_layout(np.asarray(idx), 32, 8)[2])


def test_cpu_handlers_reject_bad_values_under_jit():
  """Traced values cannot be checked in Python; the CPU handlers report them instead of skipping them."""
  cpu = jax.devices("cpu")[0]  # the CUDA handlers cannot check values without a sync; they skip them
  rows = jax.device_put(jnp.ones((2, 3, 4), jnp.float32), cpu)
  src = jax.device_put(jnp.array([[0, 9, -1], [1, -1, -1]], jnp.int32), cpu)
  combine = jax.jit(functools.partial(ffi.combine_unpack, num_tokens=4, implementation="ffi"))
  with pytest.raises(Exception, match=r"src_idx: row 1 names token 9, outside \[-1, 4\)"):
    jax.block_until_ready(combine(rows, src))
  pack = jax.jit(functools.partial(ffi.dispatch_pack, num_experts=8, num_ranks=2, implementation="ffi"))
  with pytest.raises(Exception, match=r"topk_idx: entry 1 is -5"):
    jax.block_until_ready(pack(jax.device_put(jnp.ones((1, 4)), cpu), jax.device_put(jnp.array([[0, -5]], jnp.int32), cpu)))


def test_handler_rejects_bad_ids_under_jit():
  """Traced ids cannot be checked in Python; the CPU handler reports them instead of skipping them."""
  cpu = jax.devices("cpu")[0]  # the CUDA handlers cannot check values without a sync; they skip them
  bad = jax.device_put(jnp.array([[0, 99]], jnp.int32), cpu)
  layout = jax.jit(functools.partial(ffi.dispatch_layout, num_experts=8, num_ranks=2, implementation="ffi"))
  with pytest.raises(Exception, match=r"topk_idx: entry 1 is 99, outside \[-1, 8\)"):
    jax.block_until_ready(layout(bad))


@pytest.mark.parametrize("call,match", [
    (lambda: ffi.dispatch_layout(np.zeros((4, 2), np.float32), num_experts=8, num_ranks=2), "topk_idx must be int32"),
    (lambda: ffi.dispatch_layout(np.zeros(4, np.int32), num_experts=8, num_ranks=2), "topk_idx must be int32"),
    (lambda: ffi.dispatch_layout(np.zeros((4, 2), np.int32), num_experts=9, num_ranks=2), "multiple of num_ranks"),
    (lambda: ffi.dispatch_layout(np.zeros((4, 2), np.int32), num_experts=8, num_ranks=0), "num_ranks"),
    (lambda: ffi.dispatch_layout(np.full((4, 2), 8, np.int32), num_experts=8, num_ranks=2), r"outside \[-1, 8\)"),
    (lambda: ffi.dispatch_pack(np.zeros((3, 4)), np.zeros((4, 2), np.int32), num_experts=8, num_ranks=2), "x must be"),
    (lambda: ffi.dispatch_pack(np.zeros((4, 4)), np.zeros((4, 2), np.int32), num_experts=8, num_ranks=2,
                               capacity=-1), "capacity"),
    (lambda: ffi.combine_unpack(np.zeros((2, 3, 4), np.int32), np.zeros((2, 3), np.int32), num_tokens=4), "rows must"),
    (lambda: ffi.combine_unpack(np.zeros((2, 3, 4), np.float32), np.zeros((2, 4), np.int32), num_tokens=4),
     "src_idx must be int32"),
    (lambda: ffi.combine_unpack(np.zeros((2, 3, 4), np.float32), np.full((2, 3), 4, np.int32), num_tokens=4),
     r"outside \[-1, 4\)"),
    (lambda: ffi.combine_unpack(np.zeros((1, 2, 4), np.float32), np.zeros((1, 2), np.int32), num_tokens=4),
     "names a token twice"),
    (lambda: ffi.combine_unpack(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32) - 1, num_tokens=4,
                                weights=np.ones((2, 3), np.int32)), "weights must be float32"),
    (lambda: ffi.dispatch_layout(np.zeros((4, 2), np.int32), num_experts=8, num_ranks=2, implementation="cuda"),
     "implementation='cuda' is not available"),
    (lambda: ffi.dispatch_pack(jnp.zeros((4, 4), jnp.int4), np.zeros((4, 2), np.int32), num_experts=8, num_ranks=2),
     "packs several values per byte"),
    (lambda: ffi.dispatch_pack(np.zeros((4, 4)), np.zeros((4, 2), np.int32), num_experts=8, num_ranks=8,
                               capacity=2**28), "overflow the int32 offsets"),
    (lambda: ffi.combine_unpack(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32), num_tokens=-1),
     "num_tokens must be a non-negative int"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.gpu
def test_cuda_handlers_at_deepseek_size():
  tokens, hidden, topk, num_experts, num_ranks = 4096, 7168, 8, 256, 8
  idx = jnp.asarray(_topk(9, tokens, topk, num_experts, none_share=0.0))
  x = jax.random.normal(jax.random.key(1), (tokens, hidden), jnp.bfloat16)
  for op, args, kwargs in (
      (ffi.dispatch_layout, (idx,), dict(num_experts=num_experts, num_ranks=num_ranks)),
      (ffi.dispatch_pack, (x, idx), dict(num_experts=num_experts, num_ranks=num_ranks, capacity=2000)),  # drops
      (ffi.dispatch_pack, (x[:, :1001], idx), dict(num_experts=num_experts, num_ranks=num_ranks))):  # unaligned rows
    got, want = op(*args, **kwargs, implementation="ffi"), op(*args, **kwargs, implementation="xla")
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  packed = ffi.dispatch_pack(x, idx, num_experts=num_experts, num_ranks=num_ranks, implementation="xla")
  got = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=tokens, implementation="ffi")
  want = ffi.combine_unpack(packed.buffer, packed.src_idx, num_tokens=tokens, implementation="xla")
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_default_falls_back_to_the_reference_without_a_compiler(monkeypatch):
  def no_compiler():
    raise ffi.CompilerNotFoundError("no C++ compiler (test)")

  monkeypatch.setattr(ffi.dispatch.targets, "ensure_registered_for_backend", no_compiler)
  rows = jnp.ones((2, 3, 4), jnp.float32)
  src = jnp.array([[0, 1, -1], [1, -1, -1]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(ffi.combine_unpack(rows, src, num_tokens=2)), [[1] * 4, [2] * 4])
  with pytest.raises(ffi.CompilerNotFoundError):
    ffi.combine_unpack(rows, src, num_tokens=2, implementation="ffi")
