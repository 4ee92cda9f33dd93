"""Expert-parallel dispatch + combine against an all_gather-based dispatch, in the same process.

  python -m benchmarks.bench_ep [--shapes=auto|cpu|deepep] [--repeats=10]

Runs over every local device as the `ep` axis (8 fake CPU devices on a CPU host: this module
asks for them before jax starts; on a GPU host, its GPUs). `deepep` is DeepEP's normal-mode
benchmark shape (4096 tokens per rank, H = 7168, top-8 of 256 experts) and low-latency shape
(128 tokens); `cpu` shrinks it for 2 cores.

The baseline is the dispatch every JAX MoE can write without DeepEP: all_gather every rank's
tokens, let each rank keep the rows of its experts (as a mask over all R*T rows), and sum the
outputs back to their owners with psum_scatter. Bytes use DeepEP's test accounting:
normal mode moves `received rows * H * 2` each way (bf16; FP8 rows `H + 4H/128`); low latency
`H + 4H/128 + 16` per (token, expert) slot to dispatch and `2H` to combine. GB/s is meaningful
only on GPUs with several ranks.
"""

from __future__ import annotations

import os

if "jax" not in __import__("sys").modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import functools  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import expert_parallel as ep  # noqa: E402
from benchmarks.harness import append_results, format_table, time_fn  # noqa: E402

SHAPES = {"deepep": dict(tokens=4096, hidden=7168, topk=8, experts=256, ll_tokens=128),
          "cpu": dict(tokens=512, hidden=1024, topk=8, experts=64, ll_tokens=64)}


def _all_gather_moe_move(x, topk_idx, *, num_experts, axis_name="ep"):
  """The baseline: every rank sees every token; rows of other ranks' experts are masked, outputs psum_scattered."""
  ranks = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  every_x = jax.lax.all_gather(x, axis_name, tiled=True)  # [R*T, H]
  every_idx = jax.lax.all_gather(topk_idx, axis_name, tiled=True)
  mine = ((every_idx >= 0) & (every_idx // (num_experts // ranks) == me)).any(-1)
  y = jnp.where(mine[:, None], every_x, jnp.zeros((), x.dtype)).astype(jnp.float32)  # the "experts": identity
  return jax.lax.psum_scatter(y, axis_name, tiled=True).astype(x.dtype)


def _deepep_move(x, topk_idx, *, num_experts, implementation, axis_name="ep"):
  weights = jnp.ones(topk_idx.shape, jnp.float32)
  result, handle = ep.dispatch(x, topk_idx, weights, num_experts=num_experts, implementation=implementation)
  return ep.combine(result.x.astype(jnp.float32), handle, implementation=implementation).astype(x.dtype), \
      result.num_valid


def _low_latency_move(x, topk_idx, y, *, num_experts, max_tokens, axis_name="ep"):
  """Dispatch, then combine `y` (given: the experts' outputs; converting FP8 on a CPU would dominate)."""
  recv, count, handle = ep.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank=max_tokens,
                                                num_experts=num_experts)
  out = ep.low_latency_combine(y[0], topk_idx, jnp.ones(topk_idx.shape, jnp.float32), handle)
  return out, recv, count  # recv is returned so that the dispatch's data movement is not dropped


def _routing(seed, ranks, tokens, topk, experts):
  rng = np.random.default_rng(seed)
  scores = rng.random((ranks * tokens, experts)) + 1  # DeepEP: topk of randn().abs() + 1
  return jnp.asarray(np.argsort(-scores, axis=1)[:, :topk].astype(np.int32))


def run(shapes: str = "auto", repeats: int = 10) -> list[dict]:
  if shapes == "auto":
    shapes = "deepep" if jax.default_backend() == "gpu" else "cpu"
  s = SHAPES[shapes]
  ranks = jax.device_count()
  mesh = jax.make_mesh((ranks,), ("ep",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
  shard = lambda fn: jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  rows = []
  tokens, hidden, topk, experts = s["tokens"], s["hidden"], s["topk"], s["experts"]
  idx = _routing(0, ranks, tokens, topk, experts)
  x = jax.random.normal(jax.random.key(0), (ranks * tokens, hidden), jnp.bfloat16)
  case = f"R={ranks} T={tokens}/rank H={hidden} top-{topk} of {experts}"
  baseline = shard(functools.partial(_all_gather_moe_move, num_experts=experts))
  base = time_fn(baseline, put(x), put(idx), repeats=repeats)
  rows.append({"suite": "ep", "case": case, "impl": "all_gather + psum_scatter (baseline)",
               "median_ms": round(base.median_s * 1e3, 3), "iqr_ms": round(base.iqr_s * 1e3, 3)})
  for implementation in ("xla", "ffi"):
    fn = shard(lambda x, i, impl=implementation: jax.tree.map(
        lambda a: jnp.atleast_1d(a), _deepep_move(x, i, num_experts=experts, implementation=impl)))
    try:
      timing = time_fn(fn, put(x), put(idx), repeats=repeats)
    except NotImplementedError as err:
      rows.append({"suite": "ep", "case": case, "impl": f"{implementation} dispatch + combine", "median_ms": "n/a",
                   "note": str(err)[:80]})
      continue
    _, num_valid = fn(put(x), put(idx))
    moved = float(np.asarray(num_valid).sum()) * hidden * 2 * 2 / ranks  # per rank, both ways
    rows.append({"suite": "ep", "case": case, "impl": f"{implementation} dispatch + combine",
                 "median_ms": round(timing.median_s * 1e3, 3), "iqr_ms": round(timing.iqr_s * 1e3, 3),
                 "gb_s": round(moved / timing.median_s / 1e9, 2),
                 "vs_baseline": round(base.median_s / timing.median_s, 3)})
  ll_tokens = s["ll_tokens"]
  ll_idx = _routing(1, ranks, ll_tokens, topk, experts)
  ll_x = jax.random.normal(jax.random.key(1), (ranks * ll_tokens, hidden), jnp.bfloat16)
  ll = shard(functools.partial(_low_latency_move, num_experts=experts, max_tokens=ll_tokens))
  ll_y = jax.random.normal(jax.random.key(2), (ranks, experts // ranks, ranks * ll_tokens, hidden), jnp.bfloat16)
  timing = time_fn(ll, put(ll_x), put(ll_idx), put(ll_y), repeats=repeats)
  slots = int((np.asarray(ll_idx) >= 0).sum()) / ranks
  moved = slots * ((hidden + 4 * hidden / 128 + 16) + 2 * hidden)
  ll_base = time_fn(baseline, put(ll_x), put(ll_idx), repeats=repeats)
  rows.append({"suite": "ep", "case": f"R={ranks} T={ll_tokens}/rank H={hidden} top-{topk} of {experts}",
               "impl": "low-latency FP8 dispatch + combine", "median_ms": round(timing.median_s * 1e3, 3),
               "iqr_ms": round(timing.iqr_s * 1e3, 3), "gb_s": round(moved / timing.median_s / 1e9, 2),
               "vs_baseline": round(ll_base.median_s / timing.median_s, 3),
               "note": f"baseline {ll_base.median_s * 1e3:.3f} ms"})
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """This benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_enum("shapes", "auto", ["auto", "cpu", "deepep"], "DeepEP's benchmark shapes, or shrunk for CPU.")
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (after 2 warm-up calls).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.shapes, FLAGS.repeats)
  append_results("ep", rows, command=" ".join(["python -m benchmarks.bench_ep", *sys.argv[1:]]))
  print(format_table(rows, ["case", "impl", "median_ms", "iqr_ms", "gb_s", "vs_baseline", "note"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
