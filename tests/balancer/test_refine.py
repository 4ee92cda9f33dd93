"""The local search's own bookkeeping: every scored candidate checked against loads recomputed
from scratch, and the node of every group kept."""

import numpy as np
import pytest

from balancer import gpu_loads, rebalance_experts
from balancer.quality import count_replicas
from balancer.hierarchical import rebalance_hierarchical
from balancer import refine
from balancer.refine import Layout, extra_swaps, keep_allowed, score_candidates
from balancer.synthetic import hot_expert_loads, zipf_loads


def apply(phy2log, is_swap, first, second):
  placed = phy2log.copy()
  if is_swap:
    placed[first], placed[second] = placed[second], placed[first]
  else:
    placed[first] = second
  return placed


@pytest.mark.parametrize("spread", ["pareto", "even"])  # even: other nodes' GPUs nearly as hot
@pytest.mark.parametrize("num_experts,num_replicas,num_groups,num_nodes,num_gpus", [
    (16, 24, 4, 2, 4),  # hierarchical, 2 slots per GPU
    (12, 16, 4, 2, 8),  # DeepSeek's README sizes
    (32, 48, 8, 4, 8),  # four nodes
    (16, 20, 4, 1, 2),  # one node, P < 3
    (8, 12, 2, 1, 1),  # one GPU: no swap can be allowed
    (128, 136, 1, 1, 8),  # more than 64 experts per node: move targets are pruned
    (16, 160, 1, 1, 8),  # more than 128 spare slots: spare slots are pruned
])
def test_every_scored_candidate_matches_recomputed_loads(num_experts, num_replicas, num_groups, num_nodes,
                                                         num_gpus, spread):
  rng = np.random.default_rng(num_experts + num_replicas)
  if spread == "pareto":
    weight = (rng.pareto(1.2, (3, num_experts)) * 100).astype(np.float32)
  else:
    weight = rng.uniform(90, 110, (3, num_experts)).astype(np.float32)
  greedy = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
  counts = count_replicas(greedy.phy2log, num_experts)
  on_gpu = np.zeros((3, num_experts, num_gpus), np.int64)
  np.add.at(on_gpu, (np.arange(3)[:, None], greedy.phy2log, np.arange(num_replicas) // (num_replicas // num_gpus)), 1)
  slots_per_node, experts_per_node = num_replicas // num_nodes, num_experts // num_nodes
  layout = Layout(num_gpus, num_nodes, num_replicas // num_gpus, num_gpus // num_nodes, slots_per_node,
                  experts_per_node)
  scored = score_candidates(weight.astype(np.float64), greedy.phy2log, counts, on_gpu,
                            np.argsort(greedy.expert_node, axis=-1, kind="stable"), layout)
  slot_node = np.arange(num_replicas) // slots_per_node
  checked = 0
  for layer in range(3):
    before = gpu_loads(weight[layer:layer + 1], greedy.phy2log[layer:layer + 1], counts[layer:layer + 1], num_gpus)[0]
    np.testing.assert_allclose(scored.current_max[layer], before.max(), rtol=1e-12)
    np.testing.assert_allclose(scored.current_sq[layer], (before**2).sum(), rtol=1e-12)
    for c in range(scored.ok.shape[1]):
      is_swap, first, second = scored.is_swap[layer, c], scored.first[layer, c], scored.second[layer, c]
      placed = apply(greedy.phy2log[layer], is_swap, first, second)
      if not scored.ok[layer, c]:
        continue
      assert not np.array_equal(placed, greedy.phy2log[layer]), "a no-op was allowed"
      if is_swap:
        assert first // (num_replicas // num_gpus) != second // (num_replicas // num_gpus), "swap within a GPU"
      new_counts = count_replicas(placed[None], num_experts)
      assert (new_counts >= 1).all(), "an expert lost its last replica"
      assert (greedy.expert_node[layer][placed] == slot_node).all(), "node constraint broken"
      after = gpu_loads(weight[layer:layer + 1], placed[None], new_counts, num_gpus)[0]
      np.testing.assert_allclose(scored.new_max[layer, c], after.max(), rtol=1e-9)
      np.testing.assert_allclose(scored.new_sq[layer, c], (after**2).sum(), rtol=1e-9)
      checked += 1
  assert checked > 0
  if num_gpus == 1:
    assert not scored.ok[scored.is_swap].any()


def test_refine_keeps_the_node_of_every_group():
  rng = np.random.default_rng(3)
  weight = rng.integers(50, 150, (4, 32)) + np.where(np.arange(32) == rng.integers(32, size=(4, 1)), 3000, 0)
  greedy = rebalance_experts(weight, 48, 8, 4, 16)
  refined = rebalance_experts(weight, 48, 8, 4, 16, refine=True)
  assert not np.array_equal(refined[0], greedy[0]), "refine found nothing; the check below would be idle"

  def nodes_of_groups(phy2log):
    nodes = {}
    for layer, row in enumerate(phy2log):
      for slot, expert in enumerate(row):
        nodes.setdefault((layer, expert // 4), set()).add(slot // 12)  # 4 experts a group, 12 slots a node
    return nodes

  greedy_nodes, refined_nodes = nodes_of_groups(greedy[0]), nodes_of_groups(refined[0])
  assert all(len(nodes) == 1 for nodes in refined_nodes.values())
  assert refined_nodes == greedy_nodes


def test_keep_allowed_keeps_exactly_the_allowed_entries_in_order():
  rng = np.random.default_rng(0)
  allowed = rng.random((6, 40)) < 0.3
  allowed[2] = False  # a row with nothing allowed
  values = rng.integers(0, 1000, (6, 40))
  kept_allowed, kept_values = keep_allowed(allowed, values)
  assert kept_allowed.shape[1] == allowed.sum(-1).max()
  for row in range(6):
    np.testing.assert_array_equal(kept_values[row][kept_allowed[row]], values[row][allowed[row]])
    assert not kept_allowed[row, allowed[row].sum():].any()


@pytest.mark.parametrize("sizes", [(288, 8, 4, 32), (288, 1, 1, 32)], ids=["hierarchical", "global"])
def test_bookkeeping_stays_true_to_the_placement_every_round(monkeypatch, sizes):
  # Global at V3 size has 256 experts and 288 slots in one node, so both prunings are active.
  num_replicas, num_groups, num_nodes, num_gpus = sizes
  weight = hot_expert_loads(4, 256, hot_share=0.3, seed=1) + zipf_loads(4, 256, exponent=1.0, seed=2)
  rounds = []

  def checked(weight_, phy2log, counts, replicas_on_gpu, experts_by_node, layout):
    np.testing.assert_array_equal(counts, count_replicas(phy2log, weight_.shape[1]))
    expected = np.zeros_like(replicas_on_gpu)
    np.add.at(expected, (np.arange(len(phy2log))[:, None], phy2log, np.arange(num_replicas) // layout.slots_per_gpu), 1)
    np.testing.assert_array_equal(replicas_on_gpu, expected)
    rounds.append(len(phy2log))
    return score_candidates(weight_, phy2log, counts, replicas_on_gpu, experts_by_node, layout)

  monkeypatch.setattr(refine, "score_candidates", checked)
  greedy = rebalance_experts(weight, *sizes)
  refined = rebalance_experts(weight, *sizes, refine=True)
  assert len(rounds) > 5
  before = gpu_loads(weight, greedy[0], greedy[2], num_gpus).max(-1)
  after = gpu_loads(weight, refined[0], refined[2], num_gpus).max(-1)
  assert (after <= before).all() and (after < before).any()


@pytest.mark.parametrize("num_experts,num_replicas,num_groups,num_nodes,num_gpus", [
    (64, 96, 8, 2, 16), (64, 96, 1, 1, 16), (32, 64, 4, 2, 8)])
def test_extra_swaps_are_disjoint_and_each_evens_out_its_pair(num_experts, num_replicas, num_groups, num_nodes,
                                                              num_gpus):
  rng = np.random.default_rng(num_gpus)
  weight = (rng.pareto(1.0, (4, num_experts)) * 100).astype(np.float32)
  greedy = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
  counts = count_replicas(greedy.phy2log, num_experts)
  slots_per_gpu, gpus_per_node = num_replicas // num_gpus, num_gpus // num_nodes
  layout = Layout(num_gpus, num_nodes, slots_per_gpu, gpus_per_node, num_replicas // num_nodes,
                  num_experts // num_nodes)
  used = np.zeros((4, num_gpus), bool)
  used[:, 0] = True  # as if this round's own swap had touched GPU 0
  slot_a, slot_b, found = extra_swaps(weight.astype(np.float64), greedy.phy2log, counts, used, layout, 3)
  assert found.any()
  for layer in range(4):
    before = gpu_loads(weight[layer:layer + 1], greedy.phy2log[layer:layer + 1], counts[layer:layer + 1],
                       num_gpus)[0]
    placed = greedy.phy2log[layer].copy()
    touched = {0}
    for a, b in zip(slot_a[layer][found[layer]], slot_b[layer][found[layer]]):
      gpu_a, gpu_b = a // slots_per_gpu, b // slots_per_gpu
      assert gpu_a // gpus_per_node == gpu_b // gpus_per_node, "swap across nodes"
      assert not {gpu_a, gpu_b} & touched, "two swaps of one round share a GPU"
      touched |= {gpu_a, gpu_b}
      alone = apply(greedy.phy2log[layer], True, a, b)
      pair = gpu_loads(weight[layer:layer + 1], alone[None], counts[layer:layer + 1], num_gpus)[0][[gpu_a, gpu_b]]
      assert pair.max() < before[gpu_a], "the swap does not even out its pair"
      placed = apply(placed, True, a, b)
    after = gpu_loads(weight[layer:layer + 1], placed[None], counts[layer:layer + 1], num_gpus)[0]
    assert after.max() <= before.max()
    if found[layer].any():
      assert (after**2).sum() < (before**2).sum()
