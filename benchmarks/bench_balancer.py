"""EPLB at DeepSeek-V3's size: the vectorised rebalance against the per-layer loop, and quality.

  python -m benchmarks.bench_balancer [--repeats=20]

Times `rebalance_experts` (greedy and refine) on 58 layers x 256 experts -> 288 replicas,
8 groups, 4 nodes, 32 GPUs, and under the global policy also 320 replicas on 64 GPUs and 576
on 144, against `balancer.reference` (the same algorithm in plain loops) in the same process;
then reports balancedness for several synthetic load shapes.
"""

from __future__ import annotations

import sys

from absl import app, flags

from balancer import balancedness, gpu_loads, rebalance_experts, reference, unbalanced_baseline
from balancer.synthetic import hot_expert_loads, zipf_loads
from benchmarks.harness import append_results, format_table, time_fn

LAYERS, EXPERTS = 58, 256
HIERARCHICAL = dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
GLOBAL = dict(num_replicas=288, num_groups=1, num_nodes=1, num_gpus=32)
# A wider, decode-style expert-parallel group: 64 GPUs, 64 redundant experts, one pool.
GLOBAL_64 = dict(num_replicas=320, num_groups=1, num_nodes=1, num_gpus=64)
GLOBAL_144 = dict(num_replicas=576, num_groups=1, num_nodes=1, num_gpus=144)

LOADS = {
    "zipf-1.0": lambda: zipf_loads(LAYERS, EXPERTS, exponent=1.0, seed=0),
    "zipf-0.6": lambda: zipf_loads(LAYERS, EXPERTS, exponent=0.6, seed=1),
    "hot-expert-30%": lambda: hot_expert_loads(LAYERS, EXPERTS, hot_share=0.3, seed=2),
    "uniform": lambda: zipf_loads(LAYERS, EXPERTS, exponent=0.0, seed=3),
}


def timing_rows(repeats: int) -> list[dict]:
  weight = LOADS["zipf-1.0"]()
  rows = []
  for policy, sizes in (("hierarchical", HIERARCHICAL), ("global", GLOBAL), ("global-320-on-64", GLOBAL_64),
                        ("global-576-on-144", GLOBAL_144)):
    oracle = time_fn(reference.rebalance_experts, weight, **sizes, warmup=1, repeats=max(3, repeats // 5))
    for name, fn, kwargs, n in (("loop oracle (baseline)", reference.rebalance_experts, {}, None),
                                ("vectorised greedy", rebalance_experts, {}, repeats),
                                ("vectorised + refine", rebalance_experts, {"refine": True}, 3)):
      timing = oracle if n is None else time_fn(fn, weight, **sizes, **kwargs, warmup=2, repeats=n)
      rows.append({"suite": "balancer", "case": f"time {policy} zipf-1.0", "impl": name,
                   "median_ms": round(timing.median_s * 1e3, 2), "iqr_ms": round(timing.iqr_s * 1e3, 2),
                   "speedup_vs_loop": round(oracle.median_s / timing.median_s, 1), "repeats": timing.repeats})
  return rows


def quality_rows() -> list[dict]:
  rows = []
  for load_name, make in LOADS.items():
    weight = make()
    for policy, sizes in (("hierarchical", HIERARCHICAL), ("global", GLOBAL)):
      greedy = rebalance_experts(weight, **sizes)
      refined = rebalance_experts(weight, **sizes, refine=True)
      none = unbalanced_baseline(weight, sizes["num_gpus"])
      before = balancedness(weight, greedy[0], greedy[2], sizes["num_gpus"])
      # No placement that keeps each group's node can beat the hottest node spread evenly.
      loads = gpu_loads(weight, greedy[0], greedy[2], sizes["num_gpus"])
      node_loads = loads.reshape(len(loads), sizes["num_nodes"], -1).mean(-1)
      bound = node_loads.max(-1) / loads.mean(-1)
      after = balancedness(weight, refined[0], refined[2], sizes["num_gpus"])
      rows.append({"suite": "balancer", "case": f"quality {policy} {load_name}",
                   "no_redundancy": f"{none.mean():.4f}/{none.max():.4f}",
                   "greedy": f"{before.mean():.4f}/{before.max():.4f}",
                   "refine": f"{after.mean():.4f}/{after.max():.4f}",
                   "node_bound": f"{bound.mean():.4f}/{bound.max():.4f}",
                   "refine_gain_pct": round(100 * (1 - after.mean() / before.mean()), 2),
                   "layers_improved": int((after < before).sum())})
  return rows


def run(repeats: int = 20) -> list[dict]:
  return timing_rows(repeats) + quality_rows()


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("repeats", 20, "Timed calls of the vectorised greedy rebalance.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.repeats)
  timing = [r for r in rows if r["case"].startswith("time")]
  quality = [r for r in rows if r["case"].startswith("quality")]
  print(format_table(timing, ["case", "impl", "median_ms", "iqr_ms", "speedup_vs_loop", "repeats"]))
  print("\nbalancedness mean/worst over 58 layers (max GPU load / mean GPU load)")
  print(format_table(quality, ["case", "no_redundancy", "greedy", "refine", "node_bound", "refine_gain_pct",
                             "layers_improved"]))
  path = append_results("balancer", rows, command=" ".join(["python -m benchmarks.bench_balancer", *sys.argv[1:]]))
  print(f"\nappended {len(rows)} records to {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
