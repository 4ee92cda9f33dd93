"""The executor under shard_map: every schedule's losses and gradients equal one device running the stages in turn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pipeline import schedules
from pipeline.executor import collect_grads, layout_params, pipeline_step
from pipeline.plan import make_plan

H = 16


def mlp_stage(p, x):
  """DualPipe's example stage, residual so stages compose: x + W2 tanh(W1 x)."""
  return x + jnp.tanh(x @ p["w1"]) @ p["w2"]


def mse(y, label):
  return jnp.mean((y - label) ** 2)


def _problem(num_stages, num_chunks, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  stage_params = {"w1": jax.random.normal(k[0], (num_stages, H, 2 * H)) / 4,
                  "w2": jax.random.normal(k[1], (num_stages, 2 * H, H)) / 6}
  inputs = jax.random.normal(k[2], (num_chunks, 3, H))
  labels = jax.random.normal(k[3], (num_chunks, 3, H))
  return stage_params, inputs, labels


def _reference(stage_fn, loss_fn, stage_params, inputs, labels, num_stages):
  """One device: each micro-batch through every stage in turn; gradients of the summed loss."""
  def total(sp):
    losses = []
    for m in range(inputs.shape[0]):
      x = inputs[m]
      for s in range(num_stages):
        x = stage_fn(jax.tree.map(lambda a: a[s], sp), x)
      losses.append(loss_fn(x, jax.tree.map(lambda a: a[m], labels)))
    losses = jnp.stack(losses)
    return losses.sum(), losses
  (_, losses), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(stage_params)
  return np.asarray(losses), jax.tree.map(np.asarray, grads)


def run_pipeline(schedule, stage_fn, loss_fn, stage_params, inputs, labels, num_stages):
  plan = make_plan(schedule)
  ranks = schedule.num_ranks
  mesh = jax.make_mesh((ranks,), ("pp",), devices=jax.devices()[:ranks])
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  rank_params = jax.tree.map(lambda a: put(a, P("pp")), layout_params(plan, stage_params))

  def step(params, inputs, labels):
    local = jax.tree.map(lambda a: a[0], params)  # [1, phases, ...] -> this rank's chunks
    out = pipeline_step(plan, stage_fn, loss_fn, local, inputs, labels, axis_name="pp")
    return out.losses, jax.tree.map(lambda g: g[None], out.grads)

  call = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("pp"), P(), P()), out_specs=(P(), P("pp"))))
  losses, grads = call(rank_params, put(inputs, P()), jax.tree.map(lambda a: put(a, P()), labels))
  return np.asarray(losses), collect_grads(plan, grads, num_stages)


def _assert_matches(got, want):
  losses, grads = got
  want_losses, want_grads = want
  # Not bitwise on XLA:CPU: one jit of the whole model fuses differently from per-stage VJPs
  # (measured up to 1e-6 relative on these losses).
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=0)
  for name in want_grads:
    scale = np.abs(want_grads[name]).max()
    np.testing.assert_allclose(grads[name], want_grads[name], rtol=0, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("name, ranks, chunks, num_stages", [
    ("dualpipe", 2, 4, 2), ("dualpipe", 4, 8, 4), ("dualpipe", 8, 16, 8),
    ("dualpipev", 4, 8, 8),  # a V: 2P stages on P ranks
    ("1f1b", 4, 6, 4), ("zb1p", 4, 6, 4),
])
def test_schedule_equals_one_device(name, ranks, chunks, num_stages):
  stage_params, inputs, labels = _problem(num_stages, chunks)
  got = run_pipeline(schedules.SCHEDULES[name](ranks, chunks), mlp_stage, mse, stage_params, inputs, labels,
                     num_stages)
  _assert_matches(got, _reference(mlp_stage, mse, stage_params, inputs, labels, num_stages))


def test_bad_arguments_name_themselves():
  plan = make_plan(schedules.dualpipe(2, 4))
  stage_params, inputs, labels = _problem(2, 4)
  mesh = jax.make_mesh((2,), ("pp",), devices=jax.devices()[:2])
  params = layout_params(plan, stage_params)

  def call(stage_fn, inputs):
    fn = lambda p, x, l: pipeline_step(plan, stage_fn, mse, jax.tree.map(lambda a: a[0], p), x, l)[:2]
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    return jax.shard_map(fn, mesh=mesh, in_specs=(P("pp"), P(), P()), out_specs=(P(), P("pp")))(
        jax.tree.map(lambda a: put(a, P("pp")), params), put(inputs, P()), put(labels, P()))

  with pytest.raises(ValueError, match="must keep the micro-batch's shape"):
    call(lambda p, x: (x @ p["w1"]), inputs)
  with pytest.raises(ValueError, match="inputs must hold 4 micro-batches"):
    call(mlp_stage, inputs[:3])
  with pytest.raises(ValueError, match="stage_params must hold the schedule's 2 stages"):
    layout_params(plan, jax.tree.map(lambda a: a[:1], stage_params))


def test_decoder_layer_stages_on_a_pp_by_ep_mesh():
  """DeepSeek-V3 decoder layers (MLA + MoE) as DualPipe stages, experts over `ep` inside each stage."""
  from flax import nnx

  import model
  from model.layers.block import DecoderLayer
  pp, ep, chunks, seq = 2, 4, 4, 8
  config = model.ModelConfig.from_hf({**model.PRESETS["tiny"].to_hf(), "hidden_size": 128, "q_lora_rank": 64,
                                      "kv_lora_rank": 64, "intermediate_size": 256, "moe_intermediate_size": 64,
                                      "first_k_dense_replace": 0})
  layers = [DecoderLayer(config, 1, rngs=nnx.Rngs(i)) for i in range(pp)]
  graphdef, _ = nnx.split(layers[0])
  stage_params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.to_pure_dict(nnx.state(layer)) for layer in layers])

  def stage(p, x, axis_name="ep"):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    y, _ = nnx.merge(graphdef, p)(x, positions, moe_kwargs={} if axis_name is None else {"axis_name": axis_name})
    return y

  def loss(y, label):  # a sum, so the ep ranks' shares add up to the whole micro-batch's
    return jnp.sum((y - label) ** 2) / 1000

  k = jax.random.split(jax.random.key(0), 2)
  inputs = jax.random.normal(k[0], (chunks, 2 * ep, seq, config.hidden_size))  # each micro-batch split over ep
  labels = jax.random.normal(k[1], inputs.shape)
  want_losses, want_grads = _reference(lambda p, x: stage(p, x, None), loss, stage_params, inputs, labels, pp)

  plan = make_plan(schedules.dualpipe(pp, chunks))
  mesh = jax.make_mesh((pp, ep), ("pp", "ep"))
  expert = lambda path: getattr(path[-1], "key", None) in ("w_gate", "w_up", "w_down")
  rank_params = layout_params(plan, stage_params)
  specs = jax.tree_util.tree_map_with_path(lambda path, _: P("pp", None, "ep") if expert(path) else P("pp"),
                                           rank_params)

  def step(params, inputs, labels):
    out = pipeline_step(plan, stage, loss, jax.tree.map(lambda a: a[0], params), inputs, labels)
    losses, grads = out.losses, out.grads
    # Expert gradients come back to their rank through combine's VJP; the replicated parameters'
    # are summed over ep by the VJP of their broadcast.
    return jax.lax.psum(losses, "ep"), jax.tree.map(lambda g: g[None], grads)

  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  call = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(None, "ep"), P(None, "ep")),
                               out_specs=(P(), specs)))
  losses, grads = call(jax.tree.map(put, rank_params, specs), put(inputs, P(None, "ep")), put(labels, P(None, "ep")))
  grads = collect_grads(plan, grads, pp)
  np.testing.assert_allclose(np.asarray(losses), want_losses, rtol=1e-6)

  # The f32 floor: the same one-device gradient summed in another order (each micro-batch's ep
  # quarters apart, as the ranks see them) differs from the reference by ~1e-6 of its norm on
  # these layers (measured 0.2-1.2e-6 per tensor). The pipeline's must be as close (measured
  # 0.2-1.3e-6): within twice the floor plus 2e-7.
  one = jax.jit(jax.grad(lambda p, x, l: loss(functools.reduce(
      lambda h, s: stage(jax.tree.map(lambda a: a[s], p), h, None), range(pp), x), l)))
  n = inputs.shape[1] // ep
  quarters = [one(stage_params, inputs[m, q * n:(q + 1) * n], labels[m, q * n:(q + 1) * n])
              for m in range(chunks) for q in range(ep)]
  reordered = jax.tree.map(lambda *g: np.sum(np.stack(g), axis=0), *quarters)
  relative = lambda a, b: np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
  for (path, got), want, again in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads),
                                      jax.tree.leaves(reordered)):
    assert relative(got, want) <= 2 * relative(again, want) + 2e-7, (path, relative(got, want), relative(again, want))


@pytest.mark.parametrize("name, ranks, chunks, num_stages", [("dualpipe", 4, 8, 4), ("dualpipev", 2, 4, 4)])
def test_loss_parameters_and_input_gradients(name, ranks, chunks, num_stages):
  """A head inside the loss and an embedding before the pipeline get their gradients too."""
  stage_params, inputs, labels = _problem(num_stages, chunks, seed=3)
  head = {"w": jax.random.normal(jax.random.key(4), (H, H)) / 4}

  def head_loss(lp, y, label):
    return jnp.mean((y @ lp["w"] - label) ** 2)

  def total(sp, lp, x):
    losses = []
    for m in range(chunks):
      h = x[m]
      for s in range(num_stages):
        h = mlp_stage(jax.tree.map(lambda a: a[s], sp), h)
      losses.append(head_loss(lp, h, labels[m]))
    return jnp.stack(losses).sum()
  want = jax.jit(jax.grad(total, argnums=(1, 2)))(stage_params, head, inputs)

  plan = make_plan(schedules.SCHEDULES[name](ranks, chunks))
  mesh = jax.make_mesh((ranks,), ("pp",), devices=jax.devices()[:ranks])
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))

  def step(params, lp, inputs, labels):
    out = pipeline_step(plan, mlp_stage, head_loss, jax.tree.map(lambda a: a[0], params), inputs, labels,
                        loss_params=lp)
    return out.loss_param_grads, out.input_grads

  call = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("pp"), P(), P(), P()), out_specs=(P(), P())))
  got_head, got_inputs = call(jax.tree.map(lambda a: put(a, P("pp")), layout_params(plan, stage_params)),
                              jax.tree.map(lambda a: put(a, P()), head), put(inputs, P()), put(labels, P()))
  np.testing.assert_allclose(got_head["w"], want[0]["w"], rtol=0, atol=1e-6 * np.abs(want[0]["w"]).max())
  np.testing.assert_allclose(got_inputs, want[1], rtol=0, atol=1e-6 * np.abs(want[1]).max())


def test_aux_outputs_come_back_per_micro_batch():
  """`has_aux`: the loss's side outputs (metrics, say) land at their micro-batch's index, on every rank."""
  ranks, chunks, num_stages = 2, 4, 2
  stage_params, inputs, labels = _problem(num_stages, chunks, seed=5)

  def loss_with_aux(y, label):
    return mse(y, label), {"mean": jnp.mean(y), "first": y[0, :2]}

  want = []
  for m in range(chunks):
    x = inputs[m]
    for s in range(num_stages):
      x = mlp_stage(jax.tree.map(lambda a: a[s], stage_params), x)
    want.append((jnp.mean(x), x[0, :2]))
  plan = make_plan(schedules.dualpipe(ranks, chunks))
  mesh = jax.make_mesh((ranks,), ("pp",), devices=jax.devices()[:ranks])
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  step = lambda p, x, l: pipeline_step(plan, mlp_stage, loss_with_aux, jax.tree.map(lambda a: a[0], p), x, l,
                                       has_aux=True).aux
  aux = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("pp"), P(), P()), out_specs=P()))(
      jax.tree.map(lambda a: put(a, P("pp")), layout_params(plan, stage_params)), put(inputs, P()), put(labels, P()))
  np.testing.assert_allclose(aux["mean"], [w[0] for w in want], rtol=1e-6)
  np.testing.assert_allclose(aux["first"], np.stack([w[1] for w in want]), rtol=1e-6)
