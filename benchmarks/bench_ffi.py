"""The dispatch ops' custom calls against their jnp references, in the same process.

  python -m benchmarks.bench_ffi [--repeats=10] [--tokens=4096] [--hidden=7168]

DeepSeek-V3's expert-parallel shape by default: T = 4096 tokens, H = 7168, top-8 of E = 256
experts on R = 8 ranks, bf16 rows. On CPU the "ffi" rows are the threaded C++ handlers; on a
GPU they are the CUDA handlers. The first call (which compiles the library, once per machine)
is outside the timing.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import ffi
from benchmarks.harness import append_results, format_table, time_fn


def run(repeats: int = 10, tokens: int = 4096, hidden: int = 7168, topk: int = 8, num_experts: int = 256,
        num_ranks: int = 8) -> list[dict]:
  rng = np.random.default_rng(0)
  idx = jnp.asarray(np.stack([rng.permutation(num_experts)[:topk] for _ in range(tokens)]).astype(np.int32))
  x = jax.random.normal(jax.random.key(0), (tokens, hidden), jnp.bfloat16)
  packed = ffi.dispatch_pack(x, idx, num_experts=num_experts, num_ranks=num_ranks, implementation="xla")
  cases = {
      "dispatch_layout": (ffi.dispatch_layout, (idx,), dict(num_experts=num_experts, num_ranks=num_ranks)),
      "dispatch_pack": (ffi.dispatch_pack, (x, idx), dict(num_experts=num_experts, num_ranks=num_ranks)),
      "combine_unpack": (ffi.combine_unpack, (packed.buffer, packed.src_idx), dict(num_tokens=tokens)),
  }
  rows = []
  for name, (op, args, kwargs) in cases.items():
    timings = {}
    for implementation in ("xla", "ffi"):
      fn = jax.jit(functools.partial(op, **kwargs, implementation=implementation))
      timings[implementation] = time_fn(fn, *args, warmup=2, repeats=repeats)
    base = timings["xla"]
    for implementation, timing in timings.items():
      rows.append({"suite": "ffi", "case": f"{name} T={tokens} H={hidden} K={topk} E={num_experts} R={num_ranks}",
                   "impl": implementation, "median_ms": round(timing.median_s * 1e3, 3),
                   "iqr_ms": round(timing.iqr_s * 1e3, 3), "vs_xla": round(base.median_s / timing.median_s, 2)})
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (after 2 warm-up calls).")
  flags.DEFINE_integer("tokens", 4096, "Tokens per rank.")
  flags.DEFINE_integer("hidden", 7168, "Hidden size.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.repeats, FLAGS.tokens, FLAGS.hidden)
  append_results("ffi", rows, command=" ".join(["python -m benchmarks.bench_ffi", *sys.argv[1:]]))
  print(format_table(rows, ["case", "impl", "median_ms", "iqr_ms", "vs_xla"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
