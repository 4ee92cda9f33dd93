"""Checkpoint loading: `model.from_pretrained` against reading every shard whole and placing it, in fresh processes.

  python -m benchmarks.bench_checkpoint [--hidden=1024] [--experts=32]

Writes a random DeepSeek-V3-shaped bf16 checkpoint (a few hundred MB) once, then loads it in a
new process per case, reporting seconds, GB/s of checkpoint bytes, and the process's peak
resident memory above what it held before loading:
- `from_pretrained`, one device;
- `from_pretrained` onto 8 fake CPU devices with the experts over `ep`;
- `from_pretrained` of the same model saved as FP8 (e4m3 + 128x128 scales), dequantized to bf16;
- the baseline: `safetensors.numpy.load_file` of every shard, then `jax.device_put` of every
  tensor (no transposes or expert stacking: the least a loader can do, but holding the whole
  checkpoint on the host first).
On a CPU host the "devices" are host memory too, so the loaded model counts in every peak; the
difference between peaks is the extra host copy.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time

from absl import app, flags

from benchmarks.harness import append_results, format_table


def _config(hidden: int, experts: int):
  import model
  return model.ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                           moe_intermediate_size=hidden // 2, num_hidden_layers=4, num_attention_heads=8,
                           q_lora_rank=hidden // 2, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                           v_head_dim=64, n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=4,
                           n_group=4, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=0)


def _write(path: str, fp8_path: str, hidden: int, experts: int) -> tuple[int, int]:
  import jax.numpy as jnp
  from flax import nnx

  import model
  net = model.DeepseekV3(_config(hidden, experts), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model.save_pretrained(net, path, max_shard_bytes=256 << 20)
  model.save_pretrained(net, fp8_path, fp8=True, max_shard_bytes=256 << 20)
  size = lambda p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors"))
  return size(path), size(fp8_path)


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _case(kind: str, path: str, queue) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax
  import jax.numpy as jnp
  import safetensors.numpy

  import model
  jax.block_until_ready(jnp.zeros(1) + 1)  # the runtime's own memory is not the loader's
  before = _rss_mib()
  start = time.perf_counter()
  if kind == "baseline":
    arrays = []
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
      tensors = safetensors.numpy.load_file(os.path.join(path, file))
      arrays += [jax.device_put(t) for t in tensors.values()]
      del tensors
    jax.block_until_ready(arrays)
  else:
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,)) if kind == "ep mesh" else None
    net = model.from_pretrained(path, dtype=jnp.bfloat16, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(net))
  queue.put((time.perf_counter() - start, _rss_mib() - before))


def run(hidden: int = 1024, experts: int = 32) -> list[dict]:
  context = multiprocessing.get_context("spawn")
  rows = []
  with tempfile.TemporaryDirectory() as root:
    path, fp8_path = os.path.join(root, "bf16"), os.path.join(root, "fp8")
    with context.Pool(1) as writer:
      sizes = dict(zip(("bf16", "fp8"), writer.apply(_write, (path, fp8_path, hidden, experts))))
    for kind, stored in (("baseline", "bf16"), ("from_pretrained", "bf16"), ("ep mesh", "bf16"),
                         ("from_pretrained", "fp8")):
      queue = context.Queue()
      proc = context.Process(target=_case, args=(kind, path if stored == "bf16" else fp8_path, queue))
      proc.start()
      seconds, peak_mib = queue.get(timeout=1800)  # a crashed child raises queue.Empty rather than hang
      proc.join()
      nbytes = sizes[stored]
      label = "fp8, dequantized to bf16" if stored == "fp8" else "bf16"
      rows.append({"suite": "checkpoint", "case": f"load {nbytes / 2**20:.0f} MiB {label}: {kind}",
                   "seconds": round(seconds, 3), "GB/s": round(nbytes / seconds / 1e9, 3),
                   "peak MiB above start": round(peak_mib)})
  base = rows[0]["seconds"]
  for row in rows:
    row["time vs baseline"] = round(row["seconds"] / base, 2)
  return rows


FLAGS = flags.FLAGS
flags.DEFINE_integer("hidden", 1024, "hidden size of the benchmark model")
flags.DEFINE_integer("experts", 32, "routed experts per MoE layer")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.hidden, FLAGS.experts)
  append_results("checkpoint", rows, command="python -m benchmarks.bench_checkpoint")
  print(format_table(rows, ["case", "seconds", "GB/s", "peak MiB above start", "time vs baseline"]))


if __name__ == "__main__":
  app.run(main)
