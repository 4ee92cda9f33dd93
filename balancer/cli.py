"""What `python -m balancer` does, as functions a notebook can call too."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from balancer.api import rebalance_experts
from balancer.quality import balancedness, gpu_loads, unbalanced_baseline
from balancer.synthetic import zipf_loads
from balancer.validation import as_load_matrix, check_positive_int


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The expert-parallel layout to place onto (DeepSeek-V3's by default)."""

  num_replicas: int = 288
  num_groups: int = 8
  num_nodes: int = 4
  num_gpus: int = 32

  def __post_init__(self):
    for field in dataclasses.fields(self):
      check_positive_int(field.name, getattr(self, field.name))

  @property
  def policy(self) -> str:
    return "hierarchical" if self.num_groups % self.num_nodes == 0 else "global"


# DeepSeek-V3: 61 layers, the first 3 dense, so 58 MoE layers of 256 routed experts.
DEMO_LAYERS, DEMO_EXPERTS = 58, 256


def demo_loads(seed: int = 0) -> np.ndarray:
  """`[58, 256]` int64 skewed token counts: Zipf(1.0) popularity, 65536 routed tokens a layer."""
  return zipf_loads(DEMO_LAYERS, DEMO_EXPERTS, exponent=1.0, num_tokens=65536, seed=seed)


def read_loads(path: str) -> np.ndarray:
  """Reads `[L, E]` loads from a `.npy` file or a `.json` nested list."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"loads file {path!r} is not a file" if file.exists() else f"loads file {path!r} does not exist")
  if file.suffix not in (".npy", ".json"):
    raise ValueError(f"loads file {path!r} must end in .npy or .json")
  try:
    data = np.load(file, allow_pickle=False) if file.suffix == ".npy" else json.loads(file.read_text())
  except (OSError, EOFError, ValueError) as err:
    raise ValueError(f"loads file {path!r} could not be read: {err}") from None
  return as_load_matrix(data, name=f"loads in {path}")


def placement_report(weight, cluster: Cluster, *, refine: bool = True, show_layers: int = 1,
                     output: str | None = None) -> str:
  """Places `weight` ([L, E] loads) on `cluster` and describes the result.

  The report gives balancedness (max GPU load / mean GPU load) with no redundant experts, after
  DeepSeek's greedy EPLB and, with `refine`, after the local search; then the placement of the
  first `show_layers` layers, GPU by GPU. `output` saves `phy2log`, `log2phy` and `logcnt` of
  the final placement to an `.npz` file.
  """
  weight = as_load_matrix(weight)
  if isinstance(show_layers, bool) or not isinstance(show_layers, int) or show_layers < 0:
    raise ValueError(f"show_layers must be a non-negative int, got {show_layers!r}")
  show_layers = min(show_layers, weight.shape[0])
  if output:
    output = output if output.endswith(".npz") else output + ".npz"
    if not pathlib.Path(output).absolute().parent.is_dir():
      raise ValueError(f"output {output!r}: its directory does not exist")
  c = cluster
  args = (weight, c.num_replicas, c.num_groups, c.num_nodes, c.num_gpus)
  start = time.perf_counter()
  greedy = rebalance_experts(*args)
  greedy_s = time.perf_counter() - start
  lines = [f"{weight.shape[0]} layers x {weight.shape[1]} experts -> {c.num_replicas} replicas on "
           f"{c.num_gpus} GPUs ({c.num_nodes} nodes, {c.num_groups} groups), {c.policy} policy", "",
           "balancedness = max GPU load / mean GPU load, over layers:",
           f"  {'placement':<22}{'mean':>8}{'worst':>8}"]

  def row(name, values):
    lines.append(f"  {name:<22}{values.mean():8.4f}{values.max():8.4f}")

  row("no redundant experts", unbalanced_baseline(weight, c.num_gpus))
  row("EPLB greedy", balancedness(weight, greedy[0], greedy[2], c.num_gpus))
  final = greedy
  timing = f"time: greedy {greedy_s * 1e3:.1f} ms"
  if refine:
    start = time.perf_counter()
    final = rebalance_experts(*args, refine=True)
    timing += f", with refine {(time.perf_counter() - start) * 1e3:.1f} ms"
    row("EPLB + refine", balancedness(weight, final[0], final[2], c.num_gpus))
  lines += [timing, ""]

  phy2log, log2phy, logcnt = final
  loads = gpu_loads(weight, phy2log, logcnt, c.num_gpus)
  slots_per_gpu = c.num_replicas // c.num_gpus
  gpus_per_node = c.num_gpus // c.num_nodes
  for layer in range(show_layers):
    lines.append(f"layer {layer}: GPU -> logical experts (*: replicated), GPU load")
    for gpu in range(c.num_gpus):
      experts = phy2log[layer, gpu * slots_per_gpu:(gpu + 1) * slots_per_gpu]
      names = " ".join(f"{e}{'*' if logcnt[layer, e] > 1 else ''}" for e in experts)
      lines.append(f"  node {gpu // gpus_per_node} GPU {gpu:3d}: {names:<{6 * slots_per_gpu}} {loads[layer, gpu]:.1f}")
  if output:
    np.savez(output, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)
    lines.append(f"saved phy2log {phy2log.shape}, log2phy {log2phy.shape}, logcnt {logcnt.shape} to {output}")
  return "\n".join(lines)
