"""The MoE layer: the gate against DeepSeek's algorithm, and EP on 8 devices against one device without EP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import balancer
import expert_parallel as ep
import fp8
from tests.expert_parallel.helpers import RANKS

H, I, E, T = 128, 128, 16, 6  # T tokens per rank
GATE = ep.GateConfig(num_experts=E, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
CONFIG = ep.MoEConfig(hidden_size=H, moe_intermediate_size=I, n_shared_experts=1, gate=GATE)
ROUTED = ("w_gate", "w_up", "w_down")


def _gate_numpy(x, weight, bias, cfg):
  """DeepSeek-V3's reference Gate, step by step in numpy (float64)."""
  scores = 1 / (1 + np.exp(-(x @ weight.T)))
  choice = scores + bias
  grouped = choice.reshape(len(x), cfg.n_group, -1)
  group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
  top_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, :cfg.topk_group]
  masked = np.full_like(grouped, -np.inf)
  for t in range(len(x)):
    masked[t, top_groups[t]] = grouped[t, top_groups[t]]
  idx = np.argsort(-masked.reshape(len(x), -1), axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
  w = np.take_along_axis(scores, idx, 1)
  return idx, w / w.sum(-1, keepdims=True) * cfg.routed_scaling_factor


def test_gate_matches_deepseeks_algorithm():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (32, H), jnp.float32)
  weight = jax.random.normal(keys[1], (E, H), jnp.float32) / H ** 0.5
  bias = jax.random.uniform(keys[2], (E,), jnp.float32, 0, 0.5)
  idx, w, _ = ep.route(x, weight, bias, GATE)
  want_idx, want_w = _gate_numpy(np.asarray(x, np.float64), np.asarray(weight, np.float64),
                                 np.asarray(bias, np.float64), GATE)
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(want_idx, -1))
  order = lambda i: np.argsort(i, -1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order(idx), -1),
                             np.take_along_axis(want_w, order(want_idx), -1), rtol=1e-5)
  groups = np.asarray(idx) // (E // GATE.n_group)
  assert all(len(set(g)) <= GATE.topk_group for g in groups)
  # The bias picks experts but does not weigh them: a huge bias on expert 3 selects it everywhere,
  # and its weight is still its sigmoid score (normalized).
  idx2, w2, scores = ep.route(x, weight, bias.at[3].set(100.0), GATE)
  assert (np.asarray(idx2) == 3).any(-1).all()
  picked = np.take_along_axis(np.asarray(scores), np.asarray(idx2), 1)
  np.testing.assert_allclose(w2, picked / picked.sum(-1, keepdims=True) * 2.5, rtol=1e-6)


@pytest.mark.parametrize("scoring_func, with_bias, norm", [("softmax", False, False), ("sigmoid", False, True)])
def test_gate_variants(scoring_func, with_bias, norm):
  """V2's softmax without a bias (groups scored by their max), and no normalization."""
  cfg = ep.GateConfig(num_experts=E, num_experts_per_tok=3, n_group=4, topk_group=2, scoring_func=scoring_func,
                      norm_topk_prob=norm, routed_scaling_factor=1.5)
  keys = jax.random.split(jax.random.key(1), 2)
  x = np.asarray(jax.random.normal(keys[0], (16, H), jnp.float32), np.float64)
  weight = np.asarray(jax.random.normal(keys[1], (E, H), jnp.float32) / H ** 0.5, np.float64)
  idx, w, _ = ep.route(jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32), None, cfg)
  logits = x @ weight.T
  scores = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if scoring_func == "softmax"
            else 1 / (1 + np.exp(-logits)))
  grouped = scores.reshape(16, 4, -1)
  top_groups = np.argsort(-grouped.max(-1), axis=-1, kind="stable")[:, :2]
  for t in range(16):
    allowed = np.concatenate([np.arange(g * 4, g * 4 + 4) for g in top_groups[t]])
    want = allowed[np.argsort(-scores[t, allowed], kind="stable")[:3]]
    np.testing.assert_array_equal(np.sort(np.asarray(idx[t])), np.sort(want))
    picked = scores[t, np.asarray(idx[t])]
    np.testing.assert_allclose(w[t], (picked / picked.sum() if norm else picked) * 1.5, rtol=1e-5)


def test_bad_gate_config_names_the_field():
  with pytest.raises(ValueError, match="topk_group"):
    ep.GateConfig(num_experts=E, num_experts_per_tok=2, n_group=2, topk_group=3)
  with pytest.raises(ValueError, match="scoring_func"):
    ep.GateConfig(num_experts=E, num_experts_per_tok=2, scoring_func="relu")


def _specs(params):
  return {name: P("ep") if name.removesuffix("_scale_inv") in ROUTED else P() for name in params}


def _ep_call(fn, params, x):
  """Runs `fn(params, x)` on 8 ranks: routed experts and tokens sharded, the rest replicated."""
  mesh = jax.make_mesh((RANKS,), ("ep",))
  specs = _specs(params)
  call = jax.shard_map(fn, mesh=mesh, in_specs=(specs, P("ep")), out_specs=ep.MoEOutput(P("ep"), P(), P()))
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  return call, jax.tree.map(put, params, specs), put(x, P("ep"))


def _problem(seed, dtype=jnp.float32):
  params = ep.init_params(jax.random.key(seed), CONFIG)
  x = jax.random.normal(jax.random.key(seed + 1), (RANKS * T, H), jnp.float32).astype(dtype)
  return params, x


@pytest.mark.parametrize("use_fp8", [False, True])
def test_ep_on_8_devices_equals_one_device_without_ep(use_fp8):
  params, x = _problem(1)
  call, p8, x8 = _ep_call(functools.partial(ep.moe_forward, config=CONFIG, axis_name="ep", use_fp8=use_fp8),
                          params, x)
  got = jax.jit(call)(p8, x8)
  want = jax.jit(functools.partial(ep.moe_forward, config=CONFIG, use_fp8=use_fp8))(params, x)
  np.testing.assert_allclose(np.asarray(got.out), np.asarray(want.out), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.expert_counts, want.expert_counts)
  assert int(np.asarray(got.expert_counts).sum()) == RANKS * T * GATE.num_experts_per_tok
  assert not np.asarray(got.num_dropped).any()
  if use_fp8:  # and FP8 is close to the float layer: two chained FP8 GEMMs (measured 1.3e-3; one GEMM is < 1e-3)
    exact = ep.moe_forward(params, x, CONFIG)
    assert fp8.calc_diff(got.out, exact.out) < 3e-3


def test_gradients_with_ep_equal_one_device():
  params, x = _problem(2)
  c = jax.random.normal(jax.random.key(9), x.shape, jnp.float32)
  call, p8, x8 = _ep_call(functools.partial(ep.moe_forward, config=CONFIG, axis_name="ep"), params, x)
  loss_ep = lambda p, x: (call(p, x).out * c).sum()
  loss_one = lambda p, x: (ep.moe_forward(p, x, CONFIG).out * c).sum()
  got = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(p8, x8)
  want = jax.jit(jax.grad(loss_one, argnums=(0, 1)))(params, x)
  # f32 sums in another order (per-rank expert groups): agree to 1e-5 of each gradient's scale.
  def close(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
  for name in params:
    if name != "bias":  # selection only: no gradient
      close(got[0][name], want[0][name], name)
  close(got[1], want[1], "x")


def test_decode_with_the_low_latency_layout_matches_the_fp8_forward():
  params, x = _problem(3, jnp.bfloat16)
  call, p8, x8 = _ep_call(functools.partial(ep.moe_decode, config=CONFIG, axis_name="ep",
                                            num_max_dispatch_tokens_per_rank=8), params, x)
  got = jax.jit(call)(p8, x8)
  want = ep.moe_forward(params, x, CONFIG, use_fp8=True)
  assert fp8.calc_diff(got.out.astype(jnp.float32), want.out.astype(jnp.float32)) < 1e-4
  np.testing.assert_array_equal(got.expert_counts, want.expert_counts)


def test_redundant_experts_route_to_replicas_and_change_nothing():
  params, x = _problem(4)
  load = np.random.default_rng(4).integers(1, 100, (1, E))
  phy2log, log2phy, logcnt = balancer.rebalance_experts(load, num_replicas=24, num_groups=4, num_nodes=1,
                                                        num_gpus=RANKS)
  physical = dict(params)
  for name in ROUTED:
    physical[name] = balancer.apply_placement(params[name], np.asarray(phy2log[0]))
  placement = ep.Placement(jnp.asarray(log2phy[0], jnp.int32), jnp.asarray(logcnt[0], jnp.int32))
  call, p8, x8 = _ep_call(functools.partial(ep.moe_forward, config=CONFIG, axis_name="ep", placement=placement),
                          physical, x)
  got = jax.jit(call)(p8, x8)
  want = ep.moe_forward(params, x, CONFIG)
  np.testing.assert_allclose(np.asarray(got.out), np.asarray(want.out), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.expert_counts, want.expert_counts)


def test_capacity_drops_are_reported():
  params, x = _problem(5)
  call, p8, x8 = _ep_call(functools.partial(ep.moe_forward, config=CONFIG, axis_name="ep", capacity=4), params, x)
  got = jax.jit(call)(p8, x8)
  assert int(got.num_dropped) > 0


def test_the_nnx_module_matches_the_function():
  module = ep.MoE(CONFIG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, H), jnp.float32)
  out = module(x)
  want = ep.moe_forward(module.params(), x.reshape(-1, H), CONFIG)
  assert out.out.shape == (2, 3, H)
  np.testing.assert_array_equal(out.out.reshape(-1, H), want.out)
  grads = nnx.grad(lambda m: m(x).out.sum())(module)
  assert np.abs(np.asarray(grads["w_down"][...])).sum() > 0


def _stored_fp8_and_dequantized(seed):
  """Params whose expert weights are stored FP8 (with `*_scale_inv`), and the same weights dequantized to f32."""
  stored = ep.init_params(jax.random.key(seed), CONFIG, fp8_weights=True)
  dense = {k: v for k, v in stored.items() if not k.endswith("_scale_inv")}
  for name in list(dense):
    if name + "_scale_inv" in stored:
      assert stored[name].dtype == jnp.float8_e4m3fn
      dense[name] = fp8.dequantize(stored[name], stored[name + "_scale_inv"])
  return stored, dense


def test_stored_fp8_experts_equal_their_dequantized_weights():
  stored, dense = _stored_fp8_and_dequantized(6)
  x = jax.random.normal(jax.random.key(7), (RANKS * T, H), jnp.float32)
  idx = jax.random.randint(jax.random.key(8), (len(x), 2), -1, E)
  weights = jax.random.uniform(jax.random.key(9), idx.shape)
  pairs = [ep.moe.weight(stored, n) for n in ROUTED]
  floats = [dense[n] for n in ROUTED]
  # Float path: the stored pairs are dequantized, so it is the float computation exactly.
  np.testing.assert_array_equal(ep.experts.routed_ffn(x, idx, weights, *pairs),
                                ep.experts.routed_ffn(x, idx, weights, *floats))
  # FP8 paths: stored pairs as they are vs the dequantized weights quantized again (the same blocks).
  rows = fp8.quantize_per_token(x)
  np.testing.assert_allclose(ep.experts.routed_ffn(rows, idx, weights, *pairs, use_fp8=True),
                             ep.experts.routed_ffn(rows, idx, weights, *floats, use_fp8=True), rtol=1e-6, atol=1e-6)
  # Low-latency decode (masked GEMMs), routed experts only (no shared ones): the same again.
  routed_only = lambda p: {k: v for k, v in p.items() if not k.startswith("shared")}
  call = lambda p: _ep_call(functools.partial(ep.moe_decode, config=CONFIG, axis_name="ep",
                                              num_max_dispatch_tokens_per_rank=8), routed_only(p),
                            x.astype(jnp.bfloat16))
  (call_s, p_s, x_s), (call_d, p_d, x_d) = call(stored), call(dense)
  np.testing.assert_allclose(np.asarray(jax.jit(call_s)(p_s, x_s).out, np.float32),
                             np.asarray(jax.jit(call_d)(p_d, x_d).out, np.float32), rtol=1e-2, atol=1e-6)
  # The whole layer: shared experts with stored weights run the FP8 GEMM (activation quantization only).
  got = ep.moe_forward(stored, x, CONFIG, use_fp8=True).out
  assert fp8.calc_diff(got, ep.moe_forward(dense, x, CONFIG).out) < 3e-3
