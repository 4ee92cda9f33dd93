"""The model under `jax.shard_map` with expert parallelism: routed experts split over `ep`, tokens dispatched by expert_parallel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import model
from model.sharding import partition_spec, state_specs

CFG = model.ModelConfig.preset("tiny")


def test_expert_parallel_forward_and_loss_equal_one_device():
  net = model.DeepseekV3(CFG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size, jnp.int32)
  want_logits, want = net(tokens), net.loss(tokens)
  mesh = jax.make_mesh((8,), ("ep",))
  graphdef, state = nnx.split(net)
  specs = state_specs(state, mesh)
  assert partition_spec(("layers", 1, "mlp", "w_gate"), (8, 1, 1), mesh) == P("ep")
  state = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), state, specs)
  local_tokens = jax.device_put(tokens, NamedSharding(mesh, P("ep")))

  def forward(state, tokens):
    m = nnx.merge(graphdef, state)
    logits = m(tokens, moe_kwargs={"axis_name": "ep"})
    out = m.loss(tokens, moe_kwargs={"axis_name": "ep"})  # each rank's mean over an equal share of tokens
    return logits, jax.lax.pmean(out.loss, "ep"), out.expert_counts  # counts are psum'd by the MoE

  logits, loss, counts = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(specs, P("ep")),
                                               out_specs=(P("ep"), P(), P())))(state, local_tokens)
  assert net.layers[1].mlp.w_gate[...].shape[0] == 8 and state["layers"][1]["mlp"]["w_gate"][...].sharding.spec == P("ep")
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, want.loss, rtol=1e-5)
  np.testing.assert_array_equal(counts, want.expert_counts)
