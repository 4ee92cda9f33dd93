"""Runs any `Schedule` for one training step under `jax.shard_map` on a pipeline axis.

```python
plan = make_plan(schedules.dualpipe(4, 8))
def step(chunk_params, inputs, labels):          # inside shard_map over "pp"
  return pipeline_step(plan, stage_fn, loss_fn, chunk_params, inputs, labels, axis_name="pp")
```

Each rank holds its local chunks' parameters stacked on a leading axis (`layout_params` builds
that from per-stage parameters). The executor walks the plan's ticks; at each tick every rank
selects its op with `lax.switch`:

- `F`: `jax.vjp` of the stage; the VJP's residuals are kept (except the parameters themselves,
  which are read again at the backward). At a direction's last stage the loss is taken and its
  gradient becomes the stage's output gradient.
- `B`: the VJP applied to the output gradient, input and weight gradient together.
- `Bzb` / `W`: the same VJP, the input-gradient half now and the weight-gradient half later
  (each branch keeps only its half; XLA drops the other).
- `F&B`: a forward of one chunk and a backward of another in one branch, compiled together so
  that XLA can overlap them (for example one chunk's expert all-to-all with the other's compute).

Between ticks, activations and gradients move with `ppermute` to the next or previous rank, or
stay on the rank where a V turns. Stages may use collectives on other mesh axes (`ep` on a
`pp x ep` mesh): every rank of one pipeline stage takes the same branch.

Known costs (correct, not yet efficient; see the pipeline issue's notes):
- buffers hold the micro-batches in flight on a rank (`plan.slots`: DualPipe on 8 ranks holds
  10 whatever the chunk count, one more than the simulated peak because an arriving activation
  takes its slot before its forward), but a VJP residual is recognised as a parameter only
  when it is the parameter itself, so a stage that casts or transposes its weights stores those
  copies per micro-batch in flight;
- `W` runs the stage's VJP again and keeps the weight half, so `Bzb + W` costs more than `B`;
- ticks run in lockstep, and a tick's sends are read by the next tick, so transfers do not
  overlap compute; every tick is unrolled at trace time, so compile time grows with ticks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.plan import Plan, Step

_KINDS = ("idle", "F", "B", "Bzb", "W", "FB")


def _kind(step: Step) -> str:
  if step.kind == "B" and step.zero_bubble:
    return "Bzb"
  return step.kind


class StepOutput(NamedTuple):
  losses: jax.Array  # [num_chunks] float32, every micro-batch's loss, the same on every rank
  grads: Any  # like params: this rank's chunks' gradients of the summed loss
  loss_param_grads: Any  # like loss_params (None without them), summed over micro-batches, on every rank
  input_grads: jax.Array  # [num_chunks, ...] gradient of the summed loss w.r.t. each micro-batch's input, every rank
  aux: Any = None  # with has_aux: loss_fn's aux pytree, each leaf stacked to [num_chunks, ...], on every rank


def pipeline_step(plan: Plan, stage_fn: Callable, loss_fn: Callable, params, inputs: jax.Array, labels, *,
                  loss_params=None, has_aux: bool = False, axis_name: str = "pp") -> StepOutput:
  """One forward and backward over every micro-batch, on this rank's chunks (call inside shard_map).

  Args:
    plan: `make_plan(schedule)`.
    stage_fn: `(chunk_params, x) -> y`, x and y of the same shape and dtype (one micro-batch).
    loss_fn: `(y, label) -> scalar`, or `(loss_params, y, label) -> scalar` when `loss_params`
      is given (an output head, say), applied after a direction's last stage. With has_aux it
      returns `(scalar, aux)`, aux a pytree of arrays (per-micro-batch metrics, say).
    params: this rank's chunks: a pytree whose leaves have a leading axis of `plan.num_phases`.
    inputs: `[num_chunks, ...]` every micro-batch's input (replicated; read where it enters).
    labels: a pytree of `[num_chunks, ...]` arrays, each micro-batch's labels.
    loss_params: parameters of the loss (replicated over the pipeline), or None.
    has_aux: loss_fn returns `(loss, aux)`; aux is collected per micro-batch into `StepOutput.aux`.
    axis_name: the pipeline mesh axis; its size must be the schedule's rank count.

  Returns:
    `StepOutput(losses, grads, loss_param_grads, input_grads, aux)`; the input gradients let an
    embedding before the pipeline be trained.
  """
  schedule = plan.schedule
  if jax.lax.axis_size(axis_name) != schedule.num_ranks:
    raise ValueError(f"axis {axis_name!r} has {jax.lax.axis_size(axis_name)} ranks, the schedule {schedule.num_ranks}")
  if inputs.shape[0] != schedule.num_chunks:
    raise ValueError(f"inputs must hold {schedule.num_chunks} micro-batches, got {inputs.shape[0]}")
  for leaf in jax.tree.leaves(labels):
    if leaf.shape[:1] != (schedule.num_chunks,):
      raise ValueError(f"labels must hold {schedule.num_chunks} micro-batches, got a leaf of shape {leaf.shape}")
  for leaf in jax.tree.leaves(params):
    if leaf.shape[:1] != (plan.num_phases,):
      raise ValueError(f"params leaves need a leading axis of {plan.num_phases} chunks, got shape {leaf.shape}")
  x_aval = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
  chunk_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
  y_aval = jax.eval_shape(stage_fn, chunk_avals, x_aval)
  if (y_aval.shape, y_aval.dtype) != (x_aval.shape, x_aval.dtype):
    raise ValueError(f"stage_fn must keep the micro-batch's shape and dtype {x_aval.shape} {x_aval.dtype}, "
                     f"it gives {y_aval.shape} {y_aval.dtype}")
  aux_avals = None
  if has_aux:
    label_aval = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), labels)
    loss_args = (y_aval, label_aval) if loss_params is None else (loss_params, y_aval, label_aval)
    _, aux_avals = jax.eval_shape(loss_fn, *loss_args)
  rank = jax.lax.axis_index(axis_name)
  slots = plan.slots

  state = {
      "x": jnp.zeros((slots, *x_aval.shape), x_aval.dtype),  # received activations
      "g": jnp.zeros((slots, *x_aval.shape), x_aval.dtype),  # output gradients
      "grads": jax.tree.map(jnp.zeros_like, params),
      "losses": jnp.zeros((schedule.num_chunks,), jnp.float32),
      "aux": jax.tree.map(lambda a: jnp.zeros((schedule.num_chunks, *a.shape), a.dtype), aux_avals),
      "input_grads": jnp.zeros(inputs.shape, inputs.dtype),
      "act": jnp.zeros(x_aval.shape, x_aval.dtype),  # this tick's outgoing activation
      "grad": jnp.zeros(x_aval.shape, x_aval.dtype),  # this tick's outgoing input gradient
  }
  # Every branch of the per-tick switch must return the same types, including which mesh axes
  # a value varies over: the buffers start varying over every manual axis (pp, and ep where the
  # stage dispatches tokens), whatever the stage writes into them.
  manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  # Gradients keep their parameters' types: a parameter replicated over `ep` gets a gradient
  # summed over `ep` by the VJP itself (the transpose of its implicit broadcast).
  state = {k: v if k == "grads" else jax.tree.map(lambda a: _vary(a, manual), v) for k, v in state.items()}
  if loss_params is not None:
    # Made per-rank: only the ranks holding a last stage take the loss, inside a branch, so the
    # gradient must not be summed across the pipeline there (that would be a collective only
    # some ranks reach); it is summed once at the end.
    loss_params = jax.tree.map(lambda a: _vary(a, (axis_name,)), loss_params)
    state["loss_grads"] = jax.tree.map(jnp.zeros_like, loss_params)
  # The residuals' layout, traced with the types the ticks will see (mesh axes included).
  layout = _residual_layout(stage_fn, jax.tree.map(lambda a: a[0], params), state["x"][0])
  # Each residual buffer keeps its residual's own type: a custom VJP may keep a slice of a
  # parameter replicated over `ep`, say, and its backward expects that type back.
  # (Written at a rank-dependent slot, a buffer varies over the pipeline axis in any case.)
  state["res"] = [_vary(jnp.zeros((slots, *a.shape), a.dtype), (*a.manual_axis_type.varying, axis_name))
                  for a in layout.stored]

  def chunk(phase):
    return jax.tree.map(lambda a: a[phase], params)

  def forward(state, s):
    p = chunk(s["f_phase"])
    x = jnp.where(s["first"], inputs[s["micro_batch"]], state["x"][s["f_slot"]])
    y, vjp = jax.vjp(stage_fn, p, x)
    leaves, layout.treedef = jax.tree.flatten(vjp)  # this trace's types (mesh axes included), for the backwards
    if len(leaves) != len(layout.param_index):
      raise ValueError("stage_fn's VJP changed shape between traces; it must be a pure function of (params, x)")
    stored = [leaf for leaf, index in zip(leaves, layout.param_index) if index < 0]
    state = dict(state, act=y)
    state["res"] = [buf.at[s["f_slot"]].set(leaf) for buf, leaf in zip(state["res"], stored)]
    label = jax.tree.map(lambda a: a[s["micro_batch"]], labels)

    def with_loss(state):
      if loss_params is None:
        value, dy = jax.value_and_grad(loss_fn, has_aux=has_aux)(y, label)
      else:
        value, (d_loss_params, dy) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=has_aux)(
            loss_params, y, label)
        state = dict(state, loss_grads=jax.tree.map(lambda g, d: g + d.astype(g.dtype), state["loss_grads"],
                                                    d_loss_params))
      loss, aux = value if has_aux else (value, None)
      if has_aux:
        state = dict(state, aux=jax.tree.map(lambda buf, a: buf.at[s["micro_batch"]].set(a.astype(buf.dtype)),
                                             state["aux"], aux))
      return dict(state, losses=state["losses"].at[s["micro_batch"]].set(loss.astype(jnp.float32)),
                  g=state["g"].at[s["f_slot"]].set(dy.astype(y.dtype)))
    return jax.lax.cond(s["last"], with_loss, lambda state: state, state)

  def vjp_of(state, phase, slot):
    p = chunk(phase)
    p_leaves = jax.tree.leaves(p)
    stored = iter(buf[slot] for buf in state["res"])
    leaves = [p_leaves[index] if index >= 0 else next(stored) for index in layout.param_index]
    return jax.tree.unflatten(layout.treedef, leaves), state["g"][slot]

  def backward(state, s, *, inputs_grad=True, weights=True):
    vjp, dy = vjp_of(state, s["b_phase"], s["b_slot"])
    dp, dx = vjp(dy)
    if weights:
      state = dict(state, grads=jax.tree.map(lambda g, d: g.at[s["b_phase"]].add(d.astype(g.dtype)),
                                             state["grads"], dp))
    if inputs_grad:
      seen = state["input_grads"][s["b_micro_batch"]]
      kept = jnp.where(s["b_first"], seen + dx, seen)  # only a first stage's input gradient is the micro-batch's
      state = dict(state, grad=dx, input_grads=state["input_grads"].at[s["b_micro_batch"]].set(kept))
    return state

  branches = {
      "idle": lambda state, s: state,
      "F": forward,
      "B": backward,
      "Bzb": lambda state, s: backward(state, s, weights=False),
      "W": lambda state, s: backward(state, s, inputs_grad=False),
      "FB": lambda state, s: backward(forward(state, s), s),
  }
  for t, steps in enumerate(plan.ticks):
    kinds = sorted({_kind(step) for step in steps}, key=_KINDS.index)
    if kinds == ["idle"]:
      continue
    fields = {name: _table([getattr(step, name) for step in steps], rank)
              for name in ("f_phase", "f_slot", "b_phase", "b_slot", "micro_batch", "first", "last", "b_first",
                           "b_micro_batch")}
    for name in ("f_phase", "f_slot", "b_phase", "b_slot", "micro_batch", "b_micro_batch"):
      fields[name] = jnp.maximum(fields[name], 0)  # -1 (unused) reads slot 0, harmlessly
    which = _table([kinds.index(_kind(step)) for step in steps], rank)
    state = jax.lax.switch(which, [lambda state, kind=kind: branches[kind](state, fields) for kind in kinds], state)
    state = _exchange(state, plan.transfers[t], rank, schedule.num_ranks, axis_name)
  # Each micro-batch's loss, loss-parameter and input gradients are taken on one rank: summed over pp.
  losses = jax.lax.psum(state["losses"], axis_name)
  input_grads = jax.lax.psum(state["input_grads"], axis_name)
  loss_grads = None if loss_params is None else jax.lax.psum(state["loss_grads"], axis_name)
  aux = jax.tree.map(lambda a: jax.lax.psum(a, axis_name), state["aux"]) if has_aux else None
  return StepOutput(losses, state["grads"], loss_grads, input_grads, aux)


class _Layout:
  """Which leaves of a stage's VJP are its parameters (read again) and which are stored residuals."""

  def __init__(self, treedef, param_index, stored):
    self.treedef = treedef
    self.param_index = param_index  # per VJP leaf: index into the chunk's parameter leaves, or -1
    self.stored = stored  # avals of the stored leaves


def _residual_layout(stage_fn, chunk_params, x) -> _Layout:
  """Traced (not run: `eval_shape` of a closure) on this shard_map's own values, so types carry their mesh axes."""
  found = {}

  def probe(p, x):
    _, vjp = jax.vjp(stage_fn, p, x)
    leaves, treedef = jax.tree.flatten(vjp)
    p_leaves = jax.tree.leaves(p)
    index = [next((i for i, q in enumerate(p_leaves) if q is leaf), -1) for leaf in leaves]
    found.update(treedef=treedef, index=index)
    return [leaf for leaf, i in zip(leaves, index) if i < 0]

  stored = jax.eval_shape(lambda: probe(chunk_params, x))
  return _Layout(found["treedef"], found["index"], stored)


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _table(values, rank) -> jax.Array:
  """This rank's entry of a per-rank static list."""
  return jnp.asarray(np.asarray(values))[rank]


def _exchange(state, transfers, rank, num_ranks: int, axis_name: str):
  """Sends this tick's activations and gradients and writes them into the receivers' buffers."""
  groups: dict[tuple[bool, int], list] = {}
  for transfer in transfers:
    groups.setdefault((transfer.gradient, transfer.dst - transfer.src), []).append(transfer)
  for (gradient, offset), group in sorted(groups.items()):
    payload = state["grad" if gradient else "act"]
    if offset != 0:
      payload = jax.lax.ppermute(payload, axis_name, perm=[(tr.src, tr.dst) for tr in group])
    receives = {tr.dst: tr for tr in group}
    valid = _table([r in receives for r in range(num_ranks)], rank)
    slot = _table([receives[r].slot if r in receives else 0 for r in range(num_ranks)], rank)
    key = "g" if gradient else "x"
    old = state[key][slot]
    state = dict(state, **{key: state[key].at[slot].set(jnp.where(valid, payload, old))})
  return state


def layout_params(plan: Plan, stage_params):
  """Per-stage parameters `[num_stages, ...]` -> per-rank chunks `[num_ranks, num_phases, ...]` (shard over pp).

  Stage s of each direction is model stage s; DualPipe's two directions run the same stages, so
  each stage is held twice (once per direction), DualPipeV's V holds each of its 2P stages once.
  """
  schedule = plan.schedule
  num_stages = len(schedule.directions[0])
  for leaf in jax.tree.leaves(stage_params):
    if leaf.shape[:1] != (num_stages,):
      raise ValueError(f"stage_params must hold the schedule's {num_stages} stages, got a leaf of shape {leaf.shape}")
  index = np.zeros((schedule.num_ranks, plan.num_phases), np.int32)
  for stages in schedule.directions:
    for s, (r, phase) in enumerate(stages):
      index[r, phase] = s
  return jax.tree.map(lambda a: a[index], stage_params)


def collect_grads(plan: Plan, rank_grads, num_stages: int):
  """Per-rank chunk gradients `[num_ranks, num_phases, ...]` -> per-stage `[num_stages, ...]` numpy, copies summed.

  On the host (it gathers every rank's chunks): for checking and for saving, not for a training step.
  """
  schedule = plan.schedule
  owners = [[] for _ in range(num_stages)]
  for stages in schedule.directions:
    for s, (r, phase) in enumerate(stages):
      owners[s].append((r, phase))
  def collect(g):
    g = np.asarray(jax.device_get(g))
    return np.stack([sum(g[r, phase] for r, phase in owners[s]) for s in range(num_stages)])
  return jax.tree.map(collect, rank_grads)
