"""`storage.checkpoint` save and restore of a sharded pytree, to a local directory and to the cluster.

  python -m benchmarks.bench_sharded_checkpoint [--mib=128] [--leaves=16]

Runs in a child process with 8 fake CPU devices: a pytree of `--leaves` f32 arrays, `--mib` MiB
in all, sharded over a 4 x 2 mesh, is saved and then restored onto another mesh (2 x 4,
transposed specs), to a local temporary directory and to a local 3-node, 3-replica cluster
(`3fs://`, every service its own process). The baseline, in the same process: gathering each
array to the host and `np.save`-ing it into one local file per leaf, then `np.load` and
`jax.device_put` onto the other mesh (no checksums, no manifest, no atomic commit). Restores are
checked equal to what was saved. GB/s is checkpoint bytes over wall seconds, the fastest of 3
rounds per case (the first pays one-time costs).
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import signal
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.harness import append_results, format_table
from benchmarks.local_cluster import start_cluster


def _cases(mib: int, leaves: int, local_dir: str, cluster_url: str, queue) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  import storage.checkpoint as ckpt
  rows_per_leaf = max(8, (mib << 20) // leaves // 4 // 1024 // 8 * 8)
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  other = jax.make_mesh((2, 4), ("x", "y"), devices=jax.devices()[::-1])
  rng = np.random.default_rng(0)
  host = {f"w{i}": rng.standard_normal((rows_per_leaf, 1024), np.float32) for i in range(leaves)}
  tree = {k: jax.device_put(v, NamedSharding(mesh, P("a", "b"))) for k, v in host.items()}
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P("y", "x")))
            for k, v in host.items()}
  nbytes = sum(v.nbytes for v in host.values())

  def check(restored):
    for k, v in restored.items():
      if not np.array_equal(np.asarray(v), host[k]):
        raise RuntimeError(f"restored {k} differs from what was saved")

  rows = []
  def timed(case, save, restore, repeats=3):
    """The fastest of `repeats` save-then-restore rounds: the first round pays one-time costs
    (connections, compiled gathers, first host transfers), which must not fall on whichever case runs first."""
    saved = loaded = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      save()
      saved = min(saved, time.perf_counter() - start)
      start = time.perf_counter()
      restored = restore()
      jax.block_until_ready(restored)
      loaded = min(loaded, time.perf_counter() - start)
      check(restored)
    rows.append({"suite": "sharded_checkpoint", "case": case, "mib": round(nbytes / 2**20),
                 "save_s": round(saved, 3), "save_gb_s": round(nbytes / saved / 1e9, 3),
                 "restore_s": round(loaded, 3), "restore_gb_s": round(nbytes / loaded / 1e9, 3)})

  base = os.path.join(local_dir, "baseline")
  os.makedirs(base)
  timed("baseline: np.save per leaf, gathered (local disk)",
        lambda: [np.save(os.path.join(base, f"{k}.npy"), np.asarray(v)) for k, v in tree.items()],
        lambda: {k: jax.device_put(np.load(os.path.join(base, f"{k}.npy")), t.sharding) for k, t in target.items()})
  local = os.path.join(local_dir, "ckpt")
  timed("storage.checkpoint, local disk", lambda: ckpt.save(tree, local), lambda: ckpt.restore(local, target))
  timed("storage.checkpoint, 3fs cluster", lambda: ckpt.save(tree, cluster_url),
        lambda: ckpt.restore(cluster_url, target))
  base_row = rows[0]
  for row in rows:
    row["save_vs_baseline"] = round(base_row["save_s"] / row["save_s"], 2)
    row["restore_vs_baseline"] = round(base_row["restore_s"] / row["restore_s"], 2)
  queue.put(rows)


def run(mib: int = 128, leaves: int = 16) -> list[dict]:
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    cluster, address = start_cluster(root / "cluster")
    try:
      context = multiprocessing.get_context("spawn")  # a fresh jax with 8 devices
      queue = context.Queue()
      (root / "local").mkdir()
      proc = context.Process(target=_cases, args=(mib, leaves, str(root / "local"), f"3fs://{address}/bench/ckpt",
                                                  queue))
      proc.start()
      rows = queue.get(timeout=1200)
      proc.join()
    finally:
      cluster.send_signal(signal.SIGINT)
      cluster.wait(timeout=30)
  return rows


def define_flags() -> None:
  flags.DEFINE_integer("mib", 128, "total checkpoint size in MiB (f32)")
  flags.DEFINE_integer("leaves", 16, "number of arrays in the pytree")


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.mib, FLAGS.leaves)
  append_results("sharded_checkpoint", rows,
                 command=" ".join(["python -m benchmarks.bench_sharded_checkpoint", *sys.argv[1:]]))
  columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "case")))
  print(format_table(rows, ["case", *columns]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
