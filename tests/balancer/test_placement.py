"""apply_placement and select_replicas: a MoE over the physical layout equals the logical one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balancer import apply_placement, rebalance_experts, select_replicas

NUM_EXPERTS, HIDDEN, FFN, TOKENS, TOPK = 12, 8, 16, 64, 3


def moe(params, x, expert_idx, topk_weights):
  """y[t] = sum_k w[t,k] * mlp_{expert_idx[t,k]}(x[t]); index -1 contributes nothing."""
  safe = jnp.maximum(expert_idx, 0)
  w_in, w_out = params["w_in"][safe], params["w_out"][safe]  # [T, K, d, f], [T, K, f, d]
  hidden = jax.nn.gelu(jnp.einsum("td,tkdf->tkf", x, w_in))
  out = jnp.einsum("tkf,tkfd->tkd", hidden, w_out)
  weights = jnp.where(expert_idx >= 0, topk_weights, 0.0)
  return jnp.einsum("tk,tkd->td", weights, jnp.where((expert_idx >= 0)[..., None], out, 0.0))


def random_moe(rng, num_layers=None):
  lead = (NUM_EXPERTS,) if num_layers is None else (num_layers, NUM_EXPERTS)
  params = {"w_in": rng.standard_normal(lead + (HIDDEN, FFN)).astype(np.float32),
            "w_out": rng.standard_normal(lead + (FFN, HIDDEN)).astype(np.float32)}
  x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
  scores = rng.random((TOKENS, NUM_EXPERTS)) ** 3  # skewed, so some experts get replicas
  topk_idx = np.argsort(-scores, axis=-1)[:, :TOPK].astype(np.int32)
  topk_idx[rng.random((TOKENS, TOPK)) < 0.1] = -1
  topk_weights = rng.random((TOKENS, TOPK)).astype(np.float32)
  return params, x, topk_idx, topk_weights


def loads_of(topk_idx, num_layers=1):
  counts = np.bincount(topk_idx[topk_idx >= 0], minlength=NUM_EXPERTS)
  return np.tile(counts, (num_layers, 1)) + np.arange(num_layers)[:, None]


def test_moe_over_physical_slots_equals_logical_moe():
  params, x, topk_idx, topk_weights = random_moe(np.random.default_rng(0))
  phy2log, log2phy, logcnt = rebalance_experts(loads_of(topk_idx), 16, 4, 2, 4)
  assert logcnt.max() > 1
  slots = select_replicas(topk_idx, log2phy[0], logcnt[0], offset=5)
  np.testing.assert_array_equal(np.where(topk_idx >= 0, phy2log[0][np.asarray(slots)], -1), topk_idx)
  physical = apply_placement(params, phy2log[0])
  assert physical["w_in"].shape == (16, HIDDEN, FFN)
  np.testing.assert_array_equal(moe(physical, x, slots, topk_weights), moe(params, x, topk_idx, topk_weights))


def test_replicas_share_an_experts_tokens_evenly():
  _, _, topk_idx, _ = random_moe(np.random.default_rng(1))
  phy2log, log2phy, logcnt = rebalance_experts(loads_of(topk_idx), 24, 1, 1, 4)
  slots = np.asarray(select_replicas(topk_idx, log2phy[0], logcnt[0]))
  per_slot = np.bincount(slots[slots >= 0], minlength=24)
  for expert in range(NUM_EXPERTS):
    mine = per_slot[phy2log[0] == expert]
    assert mine.sum() == (topk_idx == expert).sum()
    assert mine.max() - mine.min() <= 1


def test_stacked_layers_under_jit():
  rng = np.random.default_rng(2)
  params, x, topk_idx, topk_weights = random_moe(rng, num_layers=3)
  phy2log, log2phy, logcnt = rebalance_experts(loads_of(topk_idx, 3), 16, 2, 2, 4, refine=True)
  physical = jax.jit(apply_placement)(jax.tree.map(jnp.asarray, params), jnp.asarray(phy2log))
  for layer in range(3):
    logical = jax.tree.map(lambda p: p[layer], params)
    slots = jax.jit(select_replicas)(topk_idx, log2phy[layer], logcnt[layer])
    np.testing.assert_array_equal(moe(jax.tree.map(lambda p: p[layer], physical), x, slots, topk_weights),
                                  moe(logical, x, topk_idx, topk_weights))


def test_numpy_leaves_under_jit_take_a_traced_index():
  params = {"w": np.arange(4.0)}
  out = jax.jit(lambda phy2log: apply_placement(params, phy2log))(jnp.array([3, 0, 3]))
  np.testing.assert_array_equal(out["w"], [3.0, 0.0, 3.0])


def test_numpy_leaves_stay_numpy():
  params, *_ = random_moe(np.random.default_rng(3))
  physical = apply_placement(params, np.array([3, 3, 0]))
  assert isinstance(physical["w_in"], np.ndarray)
  np.testing.assert_array_equal(physical["w_in"][1], params["w_in"][3])


@pytest.mark.parametrize("params,phy2log,message", [
    ({"w": np.ones((4, 2))}, np.array([0, 4]), "outside \\[0, 4\\)"),
    ({"w": np.ones((4, 2))}, np.array([[0, 1]]), "leading"),
    ({"w": np.ones((4, 2)), "v": np.ones((5, 2))}, np.array([0, 1]), "experts, other leaves"),
    ({"w": np.ones((4, 2))}, np.array([0.0, 1.0]), "phy2log must be an int"),
    ({"w": np.ones((4, 2))}, np.array([0, -1]), "phy2log holds 1 values below 0"),
    ({}, np.array([0, 1]), "no array leaves"),
])
def test_apply_placement_rejects_bad_input(params, phy2log, message):
  with pytest.raises(ValueError, match=message):
    apply_placement(params, phy2log)


def test_apply_placement_takes_a_list():
  params = {"w": np.arange(4.0)}
  np.testing.assert_array_equal(apply_placement(params, [3, 0, 3])["w"], [3.0, 0.0, 3.0])


LOG2PHY, LOGCNT = np.array([[0, 1], [2, -1]]), np.array([2, 1])
SELECT_BAD = [
    (dict(topk_idx=np.array([[0, 2]])), "topk_idx holds 1 values above 1"),
    (dict(topk_idx=np.array([[2**32, 0]])), "topk_idx holds 1 values above 1"),
    (dict(topk_idx=np.array([0, 1])), "topk_idx must be \\[num_tokens, num_topk\\]"),
    (dict(logcnt=np.array([2, 1, 1])), "logcnt must be \\[num_experts=2\\]"),
    (dict(logcnt=np.array([2, 2])), "log2phy has -1 among the first logcnt"),
    (dict(logcnt=np.array([3, 1])), "logcnt holds 1 values above 2"),
    (dict(logcnt=np.array([2, 0])), "logcnt holds 1 values below 1"),
    (dict(logcnt=np.array([2.0, 1.0])), "logcnt must be an int array"),
    (dict(log2phy=LOG2PHY[None]), "log2phy must be \\[num_experts, maxcnt\\]"),
    (dict(log2phy=LOG2PHY.astype(float)), "log2phy must be an int array"),
    (dict(offset=1.5), "offset must be an int array"),
    (dict(offset=-1), "offset holds 1 values below 0"),
]


@pytest.mark.parametrize("override,message", SELECT_BAD, ids=[m for _, m in SELECT_BAD])
def test_select_replicas_rejects_bad_input(override, message):
  args = dict(topk_idx=np.array([[0, 1]]), log2phy=LOG2PHY, logcnt=LOGCNT) | override
  offset = args.pop("offset", 0)
  with pytest.raises(ValueError, match=message):
    select_replicas(**args, offset=offset)
