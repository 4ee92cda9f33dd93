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


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
  """Moves a model's parameters (and other state) onto `mesh` in place, with `partition_spec`'s layout."""
  placed = []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    value = variable.get_value()
    placed.append((path, variable.replace(jax.device_put(value, named_sharding(path, value.shape, mesh)))))
  nnx.update(model, nnx.from_flat_state(placed))
