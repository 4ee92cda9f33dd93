"""MLA decode: the split-KV path against the dense oracle in the same process, FlashMLA's accounting.

  python -m benchmarks.bench_mla [--shapes=auto|cpu|flashmla] [--implementation=xla] [--repeats=10]

`flashmla` is FlashMLA's performance table (b = 128; s_q 1 or 2; h_q 16 or 128; mean s_k 4096
or 8192; varlen; causal; h_kv = 1; d = 576, d_v = 512); `cpu` shrinks b and s_k so 2 cores
finish in about a minute; `auto` picks by platform. TFLOPS and GB/s use FlashMLA's formulas:
  flop  = b * h_q * s_q * (2 * d + 2 * d_v) * mean_attended
  bytes = b * (s_q * h_q * d * 2 + mean_attended * h_kv * d * 2 + s_q * h_q * d_v * 2)
with the cache at 656 bytes per token instead of `d * 2` for the FP8 rows. The time includes
`get_mla_metadata` only in the row that says so; FlashMLA computes it once per step.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import mla
from benchmarks.harness import append_results, format_table, time_fn

D, DV, PAGE = 576, 512, 64
FLASHMLA = [(128, s_q, h_q, s_k) for s_k in (4096, 8192) for h_q in (16, 128) for s_q in (1, 2)]
CPU = [(8, s_q, h_q, 512) for h_q in (16, 128) for s_q in (1, 2)]


def _problem(batch: int, seq_q: int, heads_q: int, mean_len: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  seqlens = np.maximum(rng.normal(mean_len, mean_len / 2, batch), seq_q).round().astype(np.int32)
  max_blocks = int(-(-seqlens.max() // PAGE))
  table = rng.permutation(batch * max_blocks).reshape(batch, max_blocks).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 2)
  q = jnp.clip(jax.random.normal(keys[0], (batch, seq_q, heads_q, D)) / 10, -1, 1).astype(jnp.bfloat16)
  cache = jnp.clip(jax.random.normal(keys[1], (batch * max_blocks, PAGE, 1, D)) / 10, -1, 1).astype(jnp.bfloat16)
  return q, cache, jnp.asarray(table), jnp.asarray(seqlens)


def _mean_attended(seqlens: np.ndarray, seq_q: int) -> float:
  limits = seqlens[:, None] - seq_q + 1 + np.arange(seq_q)[None, :]  # causal
  return float(np.clip(limits, 0, seqlens[:, None]).mean())


def run(shapes: str = "auto", implementation: str = "xla", repeats: int = 10) -> list[dict]:
  if shapes == "auto":
    shapes = "flashmla" if jax.default_backend() == "gpu" else "cpu"
  rows = []
  for batch, seq_q, heads_q, mean_len in {"flashmla": FLASHMLA, "cpu": CPU}[shapes]:
    q, cache, table, seqlens = _problem(batch, seq_q, heads_q, mean_len)
    packed = mla.quantize_kv_cache(cache)
    meta = mla.get_mla_metadata(seqlens, seq_q * heads_q, 1)
    decode = jax.jit(functools.partial(mla.flash_mla_with_kvcache, causal=True, implementation=implementation),
                     static_argnums=4, static_argnames="is_fp8_kvcache")
    with_meta = jax.jit(lambda q, c, t, s: mla.flash_mla_with_kvcache(
        q, c, t, s, DV, *mla.get_mla_metadata(s, seq_q * heads_q, 1), causal=True, implementation=implementation))
    oracle = jax.jit(functools.partial(mla.dense_decode, head_dim_v=DV, softmax_scale=D ** -0.5, causal=True,
                                       is_fp8_kvcache=False))
    base = time_fn(oracle, q, cache, table, seqlens, repeats=repeats)
    attended = _mean_attended(np.asarray(seqlens), seq_q)
    flop = batch * heads_q * seq_q * (2 * D + 2 * DV) * attended
    query_bytes = batch * (seq_q * heads_q * D * 2 + seq_q * heads_q * DV * 2)
    case = f"b={batch} s_q={seq_q} h_q={heads_q} s_k~{mean_len}"
    for label, fn, args, cache_bytes in (
        ("split-KV", decode, (q, cache, table, seqlens, DV, *meta), D * 2),
        ("split-KV + metadata", with_meta, (q, cache, table, seqlens), D * 2),
        ("split-KV, FP8 cache", functools.partial(decode, is_fp8_kvcache=True), (q, packed, table, seqlens, DV, *meta),
         mla.fp8_cache.BYTES_PER_TOKEN)):
      try:
        timing = time_fn(fn, *args, repeats=repeats)
      except NotImplementedError as err:  # a backend without this case says so in the table
        rows.append({"suite": "mla", "case": case, "impl": f"{implementation} {label}", "median_ms": "n/a",
                     "note": str(err)[:80]})
        continue
      nbytes = query_bytes + batch * attended * cache_bytes
      rows.append({"suite": "mla", "case": case, "impl": f"{implementation} {label}",
                   "median_ms": round(timing.median_s * 1e3, 3), "iqr_ms": round(timing.iqr_s * 1e3, 3),
                   "tflops": round(flop / timing.median_s / 1e12, 4), "gb_s": round(nbytes / timing.median_s / 1e9, 2),
                   "oracle_ms": round(base.median_s * 1e3, 3), "vs_oracle": round(base.median_s / timing.median_s, 3)})
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_enum("shapes", "auto", ["auto", "cpu", "flashmla"], "FlashMLA's performance cases, or shrunk for CPU.")
  flags.DEFINE_string("implementation", "xla", "mla backend to time.")
  flags.DEFINE_integer("repeats", 10, "Timed calls per case (after 2 warm-up calls).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.shapes, FLAGS.implementation, FLAGS.repeats)
  append_results("mla", rows, command=" ".join(["python -m benchmarks.bench_mla", *sys.argv[1:]]))
  print(format_table(rows, ["case", "impl", "median_ms", "iqr_ms", "tflops", "gb_s", "oracle_ms", "vs_oracle"]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
