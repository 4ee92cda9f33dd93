"""How `DeepseekV3`'s parameters lie on a mesh: routed experts split over `ep`, everything else replicated.

The routed experts' leading (expert) axis is sharded over the mesh axis `"ep"` when the mesh
has one, which is the layout `expert_parallel.moe_forward` expects inside `jax.shard_map`
(each rank holds `E / ep` experts). Every other parameter is replicated: attention and the
dense layers are small next to the experts, and the pipeline splits layers, not tensors.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

EP_AXIS = "ep"
_EXPERT_LEAVES = ("w_gate", "w_up", "w_down")


def is_routed_expert(path: tuple) -> bool:
  """Whether the state path is a routed-expert weight `[E, ...]` (or its FP8 block scales)."""
  leaf = str(path[-1]).removesuffix("_scale_inv")
  return len(path) >= 2 and path[-2] == "mlp" and leaf in _EXPERT_LEAVES


def partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The `PartitionSpec` of the parameter at `path`; ValueError if the experts do not split evenly over `ep`."""
  if EP_AXIS in mesh.axis_names and is_routed_expert(path):
    ranks = mesh.shape[EP_AXIS]
    if shape[0] % ranks:
      raise ValueError(f"{'.'.join(map(str, path))} has {shape[0]} experts, which do not split over "
                       f"the {ranks} ranks of mesh axis {EP_AXIS!r}")
    return P(EP_AXIS)
  return P()


def named_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, partition_spec(path, shape, mesh))


def state_specs(state: nnx.State, mesh: Mesh) -> nnx.State:
  """The `PartitionSpec` of every leaf of a model's state, in the state's structure: `in_specs` for `jax.shard_map`.

  Example (expert parallelism over `ep`, the batch split the same way)::

    graphdef, state = nnx.split(model)
    specs = state_specs(state, mesh)
    def forward(state, tokens):
      return nnx.merge(graphdef, state)(tokens, moe_kwargs={"axis_name": "ep"})
    logits = jax.shard_map(forward, mesh=mesh, in_specs=(specs, P("ep")), out_specs=P("ep"))(state, tokens)
  """
  return nnx.from_flat_state([(path, variable.replace(partition_spec(path, variable.get_value().shape, mesh)))
                              for path, variable in nnx.to_flat_state(state)])


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
  """Moves a model's parameters (and other state) onto `mesh` in place, with `partition_spec`'s layout."""
  state = nnx.state(model)
  placed = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), state, state_specs(state, mesh))
  nnx.update(model, placed)
