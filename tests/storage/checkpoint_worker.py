"""One process of the multi-process checkpoint test: 4 CPU devices of a 2-process, 8-device mesh (gloo).

  python -m tests.storage.checkpoint_worker COORDINATOR PROCESS_ID PATH MODE

MODE "save_restore": saves a tree sharded over both processes, restores it onto another mesh,
and checks every addressable shard against the global values. MODE "fail": process 1 fails
while writing its shards, then cannot reach the filesystem at all, then fails a restore; each
time both processes must raise (none waits for the other), and the previous checkpoint stays.
Prints "OK" on success, or "RAISED <type>: <message>" when save raised.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import storage.checkpoint as ckpt  # noqa: E402


def _global(shape, sharding, values):
  return jax.make_array_from_callback(shape, sharding, lambda index: values[index])


def _check(array, values):
  for shard in array.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index])


def main(coordinator: str, process_id: int, path: str, mode: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, 2, process_id)
  mesh = jax.make_mesh((4, 2), ("a", "b"))  # "a" spans both processes
  w = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)  # the global values, the same in both processes
  e = np.arange(8 * 4, dtype=np.int32).reshape(8, 4) - 7
  tree = {"w": _global(w.shape, NamedSharding(mesh, P("a", "b")), w),
          "e": _global(e.shape, NamedSharding(mesh, P("a")), e),    # replicated over b: written once
          "step": np.int64(11)}
  if mode == "save_restore":
    ckpt.save(tree, path)
    other = jax.make_mesh((2, 4), ("x", "y"), devices=jax.devices()[::-1])
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(other, P("y", "x"))),
              "e": jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=NamedSharding(other, P(None, "y"))),
              "step": np.int64(0)}
    got = ckpt.restore(path, target)
    _check(got["w"], w)
    _check(got["e"], e)
    assert got["step"] == 11
    manifest = ckpt.read_manifest(path)
    assert len(next(x for x in manifest["leaves"] if x["name"] == "['w']")["shards"]) == 8
    assert len(next(x for x in manifest["leaves"] if x["name"] == "['e']")["shards"]) == 4
    print("OK", flush=True)
  elif mode == "fail":
    ckpt.save(tree, path)  # a good checkpoint first
    fs, _ = ckpt._fs(path)
    real = type(fs).pipe_file

    def fail_on_shards(self, target, data, *args, **kwargs):
      if process_id == 1 and target.endswith(".bin"):
        raise OSError("simulated disk failure on process 1")
      return real(self, target, data, *args, **kwargs)

    type(fs).pipe_file = fail_on_shards
    try:
      ckpt.save({**tree, "step": np.int64(12)}, path)
    except Exception as err:  # noqa: BLE001 -- reported to the test
      print(f"RAISED {type(err).__name__}: {err}", flush=True)
    type(fs).pipe_file = real
    assert ckpt.restore(path, {"w": np.zeros_like(w), "e": np.zeros_like(e), "step": np.int64(0)})["step"] == 11

    real_fs = ckpt._fs  # process 1 cannot even reach the filesystem: the others must not wait for it
    ckpt._fs = lambda p: (_ for _ in ()).throw(ConnectionError("simulated: no route to the cluster")) \
        if process_id == 1 else real_fs(p)
    try:
      ckpt.save(tree, path)
    except Exception as err:  # noqa: BLE001
      print(f"RAISED {type(err).__name__}: {err}", flush=True)
    ckpt._fs = real_fs

    real_read = ckpt._read_shard  # a restore onto shardings across both processes fails on process 1
    ckpt._read_shard = lambda *a: (_ for _ in ()).throw(ValueError("simulated: shard fails its checksum")) \
        if process_id == 1 else real_read(*a)
    try:
      ckpt.restore(path, {"w": tree["w"], "e": tree["e"], "step": np.int64(0)})
    except Exception as err:  # noqa: BLE001
      print(f"RAISED {type(err).__name__}: {err}", flush=True)
    ckpt._read_shard = real_read
    print("OK", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
