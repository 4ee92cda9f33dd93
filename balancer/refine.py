"""Local search that improves a greedy placement, layer by layer, never raising a layer's peak.

Each round looks at the hottest GPU of every still-improving layer and tries two kinds of move
inside that GPU's node (so the hierarchical policy's node constraint holds):

  swap   a replica on the hottest GPU trades places with a lighter replica on another GPU;
  move   a redundant replica (its expert has >= 2) is handed to another expert, either a slot
         leaving the hottest GPU, or a slot anywhere in the node going to an expert that sits
         on the hottest GPU (which then carries a smaller share of it).

On wide nodes the moves are bounded: the 128 spare slots cheapest to give up, and the 64
experts lightest after gaining a replica (see score_candidates). Every candidate is scored by
the node's new GPU loads. The best one that lowers the maximum GPU load is taken; failing
that, the best one that keeps the maximum and lowers the sum of squared GPU loads (so
plateaus with several equally hot GPUs are left). When the round's move is a swap, the
next-hottest GPUs that it left alone each get a balancing swap too (see extra_swaps), which
wide pools need to finish in few rounds. Both keys fall strictly every round, so the search
ends; it also stops after `max_rounds`. The work is vectorised across layers and candidates;
the loop runs over rounds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from balancer.quality import count_replicas

# Relative improvement a move must bring, so float noise cannot make the search cycle.
_TOLERANCE = 1e-9
# Bounds the partners of the moves scored per layer and round (see score_candidates).
_LIGHT_TARGETS = 64
# Balancing swaps added to a round whose move was a swap (see extra_swaps).
_MAX_EXTRA_SWAPS = 16


class Layout(NamedTuple):
  num_gpus: int  # P
  num_nodes: int  # N
  slots_per_gpu: int  # R / P
  gpus_per_node: int  # P / N
  slots_per_node: int  # R / N
  experts_per_node: int  # E / N


def refine_placement(weight: np.ndarray, phy2log: np.ndarray, expert_node: np.ndarray, num_nodes: int,
                     num_gpus: int, *, max_rounds: int | None = None) -> np.ndarray:
  """Improves a placement by local search; see the module docstring.

  Args:
    weight: `[L, E]` float32 loads.
    phy2log: `[L, R]` int64, the starting placement. Every expert has at least one replica,
      and every replica of expert e lies on node `expert_node[l, e]`.
    expert_node: `[L, E]` int64, node of each expert; each node hosts exactly E/N experts.
    num_nodes: N, dividing `num_gpus`; GPU g is on node `g // (P/N)`.
    num_gpus: P, dividing R.
    max_rounds: cap on rounds; default 4 * R.

  Returns:
    `[L, R]` int64, the refined `phy2log`. Replica counts may differ from the input's; no
    layer's maximum GPU load is higher than the input's.
  """
  num_layers, num_experts = weight.shape
  num_replicas = phy2log.shape[1]
  slots_per_node = num_replicas // num_nodes
  experts_per_node = num_experts // num_nodes
  layout = Layout(num_gpus=num_gpus, num_nodes=num_nodes, slots_per_gpu=num_replicas // num_gpus,
                   gpus_per_node=num_gpus // num_nodes, slots_per_node=slots_per_node,
                   experts_per_node=experts_per_node)
  weight = weight.astype(np.float64)
  phy2log = phy2log.astype(np.int64, copy=True)
  layer_col = np.arange(num_layers)[:, None]
  slot_gpu = np.arange(num_replicas) // layout.slots_per_gpu
  counts = count_replicas(phy2log, num_experts)
  replicas_on_gpu = np.zeros((num_layers, num_experts, num_gpus), np.int64)
  np.add.at(replicas_on_gpu, (layer_col, phy2log, slot_gpu[None, :]), 1)
  # Node n's experts are experts_by_node[:, n*E/N : (n+1)*E/N].
  experts_by_node = np.argsort(expert_node, axis=-1, kind="stable")

  max_extra = max(0, min(layout.gpus_per_node // 2 - 1, _MAX_EXTRA_SWAPS))  # disjoint pairs left in a node
  active = np.arange(num_layers)
  for _ in range(4 * num_replicas if max_rounds is None else max_rounds):
    if active.size == 0:
      break
    improved, kind_is_swap, first, second = _choose(score_candidates(
        weight[active], phy2log[active], counts[active], replicas_on_gpu[active], experts_by_node[active], layout))
    active = active[improved]
    kind_is_swap, first, second = kind_is_swap[improved], first[improved], second[improved]

    _apply_swaps(phy2log, replicas_on_gpu, active[kind_is_swap], first[kind_is_swap], second[kind_is_swap],
                 slot_gpu)
    moves = active[~kind_is_swap]
    slot, new_expert = first[~kind_is_swap], second[~kind_is_swap]
    old_expert = phy2log[moves, slot]
    phy2log[moves, slot] = new_expert
    np.add.at(counts, (moves, old_expert), -1)
    np.add.at(counts, (moves, new_expert), 1)
    np.add.at(replicas_on_gpu, (moves, old_expert, slot_gpu[slot]), -1)
    np.add.at(replicas_on_gpu, (moves, new_expert, slot_gpu[slot]), 1)

    # Where the round's move was a swap, the next-hottest GPUs get balancing swaps of their own
    # on GPUs it left alone: a wide pool then needs far fewer rounds.
    swapped = active[kind_is_swap]
    if swapped.size and max_extra:
      used = np.zeros((swapped.size, num_gpus), bool)
      used[np.arange(swapped.size), slot_gpu[first[kind_is_swap]]] = True
      used[np.arange(swapped.size), slot_gpu[second[kind_is_swap]]] = True
      slot_a, slot_b, found = extra_swaps(weight[swapped], phy2log[swapped], counts[swapped], used, layout, max_extra)
      layers = np.broadcast_to(swapped[:, None], found.shape)
      _apply_swaps(phy2log, replicas_on_gpu, layers[found], slot_a[found], slot_b[found], slot_gpu)
  return phy2log


def _apply_swaps(phy2log, replicas_on_gpu, layers, slot_a, slot_b, slot_gpu):
  """Swaps the experts of slots `slot_a` and `slot_b` in `layers` (all `[n]`), in place."""
  expert_a, expert_b = phy2log[layers, slot_a], phy2log[layers, slot_b]
  gpu_a, gpu_b = slot_gpu[slot_a], slot_gpu[slot_b]
  phy2log[layers, slot_a], phy2log[layers, slot_b] = expert_b, expert_a
  np.add.at(replicas_on_gpu, (layers, expert_a, gpu_a), -1)
  np.add.at(replicas_on_gpu, (layers, expert_a, gpu_b), 1)
  np.add.at(replicas_on_gpu, (layers, expert_b, gpu_b), -1)
  np.add.at(replicas_on_gpu, (layers, expert_b, gpu_a), 1)


def extra_swaps(weight, phy2log, counts, used, layout: Layout, max_extra: int):
  """Balancing swaps for the hottest GPUs that no other change of this round touches.

  Takes the hottest unused GPU, finds the swap with a lighter replica on an unused GPU of its
  node that brings the pair's larger load lowest, below the hot GPU's, and marks both GPUs
  used; up to `max_extra` times. Each swap only evens out its own pair, so together they lower
  the sum of squared GPU loads and raise no GPU above the current maximum.

  Args:
    weight: `[B, E]` float64; phy2log `[B, R]` int64; counts `[B, E]` int64.
    used: `[B, P]` bool, GPUs already changed this round.
    layout: the cluster's sizes.
    max_extra: swaps to look for per layer.

  Returns:
    `(slot_a, slot_b, found)`, each `[B, max_extra]`: the slots to swap, and whether a swap
    was found (the slots are meaningless where not).
  """
  batch = phy2log.shape[0]
  rows = np.arange(batch)
  s, pn = layout.slots_per_gpu, layout.gpus_per_node
  slot_load = np.take_along_axis(weight / counts, phy2log, axis=-1)
  load = slot_load.reshape(batch, layout.num_gpus, s).sum(-1)
  used = used.copy()
  slot_a, slot_b, found = [], [], []
  for _ in range(max_extra):
    hot = np.where(used, -np.inf, load).argmax(-1)
    hot_free = ~used[rows, hot]
    hot_slots = hot[:, None] * s + np.arange(s)
    node_slots = (hot // pn)[:, None] * layout.slots_per_node + np.arange(layout.slots_per_node)
    other_gpu = node_slots // s
    diff = slot_load[rows[:, None], hot_slots][:, :, None] - slot_load[rows[:, None], node_slots][:, None, :]
    hot_load = load[rows, hot]
    pair_max = np.maximum(hot_load[:, None, None] - diff, np.take_along_axis(load, other_gpu, -1)[:, None, :] + diff)
    free = ~np.take_along_axis(used, other_gpu, -1) & (other_gpu != hot[:, None])
    ok = ((diff > 0) & free[:, None, :] & (pair_max < (hot_load * (1 - _TOLERANCE))[:, None, None])
          & hot_free[:, None, None]).reshape(batch, -1)
    best = np.argmin(np.where(ok, pair_max.reshape(batch, -1), np.inf), axis=-1)
    a, b = hot_slots[rows, best // layout.slots_per_node], node_slots[rows, best % layout.slots_per_node]
    hit = ok[rows, best]
    used[rows, hot] = True  # with or without a swap, this GPU is done for the round
    used[rows[hit], b[hit] // s] = True
    slot_a.append(a), slot_b.append(b), found.append(hit)
  return np.stack(slot_a, 1), np.stack(slot_b, 1), np.stack(found, 1)


class Candidates(NamedTuple):
  """Every candidate move of a batch of B layers, C per layer, with the GPU loads it would give.

  Attributes:
    is_swap: `[B, C]` bool; a swap trades slots `first` and `second`, a move hands slot
      `first` to expert `second`.
    first, second: `[B, C]` int64.
    ok: `[B, C]` bool, whether the move is allowed (and not a no-op).
    new_max, new_sq: `[B, C]` float64, the maximum and the sum of squares of the GPU loads
      after the move.
    current_max, current_sq: `[B]` float64, the same before it.
  """

  is_swap: np.ndarray
  first: np.ndarray
  second: np.ndarray
  ok: np.ndarray
  new_max: np.ndarray
  new_sq: np.ndarray
  current_max: np.ndarray
  current_sq: np.ndarray


def _choose(c: Candidates):
  """Each layer's best candidate: the lowest new maximum if any lowers it, else the lowest sum
  of squares among those that keep it.

  Returns:
    `(improved [B] bool, is_swap [B] bool, first [B], second [B])`.
  """
  batch = c.ok.shape[0]
  lowers_max = c.ok & (c.new_max < (c.current_max * (1 - _TOLERANCE))[:, None])
  keeps_max = c.ok & (c.new_max <= c.current_max[:, None])
  best_lowering = np.argmin(np.where(lowers_max, c.new_max, np.inf), axis=-1)
  best_flattening = np.argmin(np.where(keeps_max, c.new_sq, np.inf), axis=-1)
  any_lowering = lowers_max.any(-1)
  choice = np.where(any_lowering, best_lowering, best_flattening)
  flat = np.arange(batch)
  flattens = keeps_max[flat, best_flattening] & (c.new_sq[flat, best_flattening] < c.current_sq * (1 - _TOLERANCE))
  return any_lowering | flattens, c.is_swap[flat, choice], c.first[flat, choice], c.second[flat, choice]


def keep_allowed(allowed: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Moves each row's allowed entries to the front, in order, and cuts the columns to the
  largest allowed count of any row (at least 1).

  Args:
    allowed: `[B, C]` bool.
    arrays: `[B, C]` arrays gathered alongside.

  Returns:
    `(allowed, *arrays)`, each `[B, C']`; `allowed` is False in the padding.
  """
  keep = max(1, int(allowed.sum(-1).max()))
  order = np.argsort(~allowed, axis=-1, kind="stable")[:, :keep]
  return tuple(np.take_along_axis(a, order, axis=-1) for a in (allowed, *arrays))


def score_candidates(weight, phy2log, counts, replicas_on_gpu, experts_by_node, layout: Layout) -> Candidates:
  """Lists and scores the candidate moves around each layer's hottest GPU.

  Args:
    weight: `[B, E]` float64 loads.
    phy2log: `[B, R]` int64 placement; counts `[B, E]` int64 replicas per expert;
      replicas_on_gpu `[B, E, P]` int64; experts_by_node `[B, E]` int64 (see refine_placement).
    layout: the cluster's sizes.
  """
  batch, num_replicas = phy2log.shape
  rows = np.arange(batch)[:, None]
  s, pn = layout.slots_per_gpu, layout.gpus_per_node

  slot_load = np.take_along_axis(weight / counts, phy2log, axis=-1)
  load = slot_load.reshape(batch, layout.num_gpus, s).sum(-1)
  hot = load.argmax(-1)
  node = hot // pn
  in_node = (np.arange(layout.num_gpus) // pn)[None, :] == node[:, None]
  node_gpus = node[:, None] * pn + np.arange(pn)
  node_load = np.take_along_axis(load, node_gpus, axis=-1)
  outside_max = np.where(in_node, -np.inf, load).max(-1)
  outside_sq = np.where(in_node, 0.0, load**2).sum(-1)
  current_max = load.max(-1)
  current_sq = outside_sq + (node_load**2).sum(-1)

  hot_slots = hot[:, None] * s + np.arange(s)
  node_slots = node[:, None] * layout.slots_per_node + np.arange(layout.slots_per_node)

  # Swaps: (a on the hottest GPU) x (b anywhere in the node, on another GPU, lighter). Only two
  # GPUs change, so each swap is scored from scalars: the hottest loses `diff` > 0 and b's GPU
  # gains it. Every other GPU stays, so the new maximum is the larger of those two and the
  # second-highest load before the swap (if b's GPU held that, it only grew).
  diff = slot_load[rows, hot_slots][:, :, None] - slot_load[rows, node_slots][:, None, :]
  other_gpu = node_slots // s
  swap_ok = ((diff > 0) & (other_gpu != hot[:, None])[:, None, :]).reshape(batch, -1)
  second_max = np.where(np.arange(layout.num_gpus)[None, :] == hot[:, None], -np.inf, load).max(-1)
  other_load = np.take_along_axis(load, other_gpu, -1)
  new_hot = current_max[:, None, None] - diff
  new_other = other_load[:, None, :] + diff
  swap_max = np.maximum(np.maximum(new_hot, new_other), second_max[:, None, None]).reshape(batch, -1)
  swap_sq = (current_sq[:, None, None] - current_max[:, None, None]**2 - other_load[:, None, :]**2
             + new_hot**2 + new_other**2).reshape(batch, -1)

  # Moves (slot -> new expert), two kinds, each with a bounded number of partners so that large
  # nodes stay cheap (the partners left out rarely win):
  # (i) a spare slot (its expert has >= 2 replicas) goes to an expert on the hot GPU; the
  #     2 * _LIGHT_TARGETS spare slots whose expert keeps the smallest share, then on the
  #     least-loaded GPUs, are tried;
  # (ii) a slot on the hot GPU goes to an expert on the hot GPU, or to one of the _LIGHT_TARGETS
  #     experts of the node whose share would be smallest after gaining a replica.
  hot_experts = phy2log[rows, hot_slots]
  node_experts = np.take_along_axis(
      experts_by_node, node[:, None] * layout.experts_per_node + np.arange(layout.experts_per_node), axis=-1)
  slot_expert = phy2log[rows, node_slots]
  slot_count = counts[rows, slot_expert]
  share_if_given = np.where(slot_count >= 2, weight[rows, slot_expert] / np.maximum(slot_count - 1, 1), np.inf)
  by_cost = np.lexsort((other_load, share_if_given), axis=-1)
  spare_slots = np.take_along_axis(node_slots, by_cost[:, :2 * _LIGHT_TARGETS], axis=-1)
  if node_experts.shape[1] > _LIGHT_TARGETS:
    share_after = np.take_along_axis(weight / (counts + 1), node_experts, axis=-1)
    lightest = np.argsort(share_after, axis=-1, kind="stable")[:, :_LIGHT_TARGETS]
    node_experts = np.take_along_axis(node_experts, lightest, axis=-1)
  targets = np.concatenate([hot_experts, node_experts], axis=1)
  move_slot = np.concatenate([
      np.broadcast_to(spare_slots[:, :, None], spare_slots.shape + (s,)).reshape(batch, -1),
      np.broadcast_to(hot_slots[:, :, None], hot_slots.shape + (targets.shape[1],)).reshape(batch, -1),
  ], axis=1)
  move_expert = np.concatenate([
      np.broadcast_to(hot_experts[:, None, :], (batch, spare_slots.shape[1], s)).reshape(batch, -1),
      np.broadcast_to(targets[:, None, :], (batch, s, targets.shape[1])).reshape(batch, -1),
  ], axis=1)
  old_expert = phy2log[rows, move_slot]
  move_ok = (counts[rows, old_expert] >= 2) & (move_expert != old_expert)
  # Most listed moves are not allowed (a hot slot's expert often has one replica): drop them
  # before the [B, C, P/N] arithmetic.
  move_ok, move_slot, move_expert, old_expert = keep_allowed(move_ok, move_slot, move_expert, old_expert)
  count_old, count_new = counts[rows, old_expert], counts[rows, move_expert]
  weight_old, weight_new = weight[rows, old_expert], weight[rows, move_expert]
  count_old_after = np.maximum(count_old - 1, 1)
  rise_old = weight_old / count_old_after - weight_old / count_old
  fall_new = weight_new / (count_new + 1) - weight_new / count_new
  # The moved slot itself: it counted as a replica of old (now at the risen share), but holds new.
  slot_fix = weight_new / (count_new + 1) - weight_old / count_old_after
  # New loads of the node's GPUs, built in place: [B, C, P/N]. Fancy indices on (layer,
  # expert, node) and a plain slice over the node's GPUs, so numpy copies whole rows.
  by_node = replicas_on_gpu.reshape(batch, -1, layout.num_nodes, pn)
  new_node = by_node[rows, old_expert, node[:, None]] * rise_old[..., None]
  new_node += by_node[rows, move_expert, node[:, None]] * fall_new[..., None]
  new_node += node_load[:, None, :]
  batch_index, candidate_index = np.indices(move_slot.shape)
  new_node[batch_index, candidate_index, move_slot // s - node[:, None] * pn] += slot_fix
  move_max = np.maximum(new_node.max(-1), outside_max[:, None])
  move_sq = np.einsum("bcp,bcp->bc", new_node, new_node) + outside_sq[:, None]

  swap_shape = (batch, s, layout.slots_per_node)
  return Candidates(
      is_swap=np.concatenate([np.ones(swap_ok.shape, bool), np.zeros(move_ok.shape, bool)], axis=1),
      first=np.concatenate([np.broadcast_to(hot_slots[:, :, None], swap_shape).reshape(batch, -1), move_slot], axis=1),
      second=np.concatenate([np.broadcast_to(node_slots[:, None, :], swap_shape).reshape(batch, -1), move_expert],
                            axis=1),
      ok=np.concatenate([swap_ok, move_ok], axis=1),
      new_max=np.concatenate([swap_max, move_max], axis=1),
      new_sq=np.concatenate([swap_sq, move_sq], axis=1),
      current_max=current_max,
      current_sq=current_sq)
