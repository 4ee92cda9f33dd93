"""Sharded checkpoints: save a pytree of sharded arrays, restore it on the same or another mesh, locally and on the cluster; an unfinished save leaves the previous checkpoint intact."""

from __future__ import annotations

import subprocess
import sys

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import storage.checkpoint as ckpt
from tests.ports import reserved_port
from tests.storage.local_cluster import LocalCluster


def _tree(mesh, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  return {"w": put(jax.random.normal(k[0], (16, 24)), P("a", "b")),   # split both ways
          "experts": put(jax.random.normal(k[1], (8, 6, 4), jnp.bfloat16), P("a")),  # split, replicated over b
          "bias": put(jnp.arange(24, dtype=jnp.int32), P()),           # replicated: one copy written
          "step": np.int64(7 + seed), "table": np.arange(6.0).reshape(2, 3)}


def _abstract(tree, mesh, specs):
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype if not isinstance(v, jax.Array) else v.dtype,
                                  sharding=NamedSharding(mesh, specs[k])) for k, v in tree.items()}


def _check(got, want):
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("cluster"), gc_delay_s=0.0) as c:
    yield c


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_restore_on_the_same_and_another_mesh(where, tmp_path, cluster):
  path = str(tmp_path / "ckpt") if where == "local" else f"3fs://{cluster.address}/ckpt-{id(tmp_path)}/step_1"
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  tree = _tree(mesh)
  ckpt.save(tree, path)
  manifest = ckpt.read_manifest(path)
  w = next(e for e in manifest["leaves"] if e["name"] == "['w']")
  assert len(w["shards"]) == 8 and w["dtype"] == "float32"
  assert len(next(e for e in manifest["leaves"] if e["name"] == "['bias']")["shards"]) == 1

  same = {"w": P("a", "b"), "experts": P("a"), "bias": P(), "step": P(), "table": P()}
  _check(ckpt.restore(path, _abstract(tree, mesh, same)), tree)
  other_mesh = jax.make_mesh((2, 4), ("x", "y"), devices=jax.devices()[::-1])
  other = {"w": P("y", "x"), "experts": P(None, "x", "y"), "bias": P("x"), "step": P(), "table": P(None, None)}
  restored = ckpt.restore(path, _abstract(tree, other_mesh, other))
  _check(restored, tree)
  assert restored["w"].sharding.spec == P("y", "x")


def test_an_unfinished_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  mesh = jax.make_mesh((8,), ("a",))
  path = str(tmp_path / "ckpt")
  first = {"w": jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("a")))}
  ckpt.save(first, path)
  fs = fsspec.filesystem("file")
  real = fs.pipe_file
  calls = []

  def crash_on_the_manifest(self, target, data, *args, **kwargs):  # the crash: after the shards, before the commit
    if target.endswith(ckpt.MANIFEST):
      raise OSError("simulated crash")
    calls.append(target)
    return real(target, data, *args, **kwargs)

  monkeypatch.setattr(type(fs), "pipe_file", crash_on_the_manifest)
  with pytest.raises(OSError, match="simulated crash"):
    ckpt.save({"w": first["w"] * 2}, path)
  monkeypatch.undo()
  assert calls  # the second save did write its shards
  abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P("a")))}
  _check(ckpt.restore(path, abstract), first)
  with pytest.raises(ValueError, match="not a finished checkpoint"):
    ckpt.read_manifest(path + ".partial")
  ckpt.save({"w": first["w"] * 3}, path)  # the next save clears the leftover and commits
  _check(ckpt.restore(path, abstract), {"w": first["w"] * 3})


def test_corruption_and_mismatches_name_the_leaf(tmp_path):
  mesh = jax.make_mesh((8,), ("a",))
  path = str(tmp_path / "ckpt")
  tree = {"w": jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("a")))}
  ckpt.save(tree, path)
  good = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P()))}
  with pytest.raises(ValueError, match=r"leaf \['w'\]: checkpoint has float32\[64\], target float32\[32\]"):
    ckpt.restore(path, {"w": jax.ShapeDtypeStruct((32,), jnp.float32)})
  with pytest.raises(ValueError, match="missing"):
    ckpt.restore(path, {"v": good["w"]})
  shard = tmp_path / "ckpt" / ckpt.read_manifest(path)["leaves"][0]["shards"][3]["file"]
  data = bytearray(shard.read_bytes())
  data[0] ^= 1
  shard.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="fails its checksum"):
    ckpt.restore(path, good)


def test_host_values_other_filesystems_and_the_old_fallback(tmp_path):
  """Host leaves come back as numpy, exactly (int64 beyond 32 bits); memory:// works; a save stopped between its renames is found at .old."""
  tree = {"step": np.int64(2**33 + 5), "rows": np.arange(10, dtype=np.float64)}
  ckpt.save(tree, "memory://ckpt/a")
  got = ckpt.restore("memory://ckpt/a", tree)
  assert got["step"] == 2**33 + 5 and got["step"].dtype == np.int64 and got["rows"].dtype == np.float64

  path = str(tmp_path / "ckpt")
  ckpt.save(tree, path)
  (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # as if stopped after moving the old one aside
  assert ckpt.restore(path, tree)["step"] == 2**33 + 5
  ckpt.save({"step": np.int64(1), "rows": tree["rows"]}, path)  # commits and clears .old
  assert not (tmp_path / "ckpt.old").exists() and ckpt.restore(path, tree)["step"] == 1

  with pytest.raises(ValueError, match=r"leaf \['bad'\] has dtype object"):
    ckpt.save({"bad": np.array([object()])}, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="root"):
    ckpt.save(tree, "memory://")


def _two_processes(path: str, mode: str) -> list[str]:
  with reserved_port() as port:  # held until both processes are done with the coordinator
    procs = [subprocess.Popen([sys.executable, "-m", "tests.storage.checkpoint_worker", f"127.0.0.1:{port}", str(i),
                               path, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
      outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
      for p in procs:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0 and "OK" in out, out[-3000:]
  return outputs


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_two_processes_save_their_shards_and_restore_onto_another_mesh(where, tmp_path, cluster):
  path = str(tmp_path / "ckpt") if where == "local" else f"3fs://{cluster.address}/two-{id(tmp_path)}/ckpt"
  _two_processes(path, "save_restore")


def test_a_failure_on_one_process_raises_on_every_process(tmp_path):
  """Process 1 fails (writing shards, reaching the filesystem, restoring): it raises its error, process 0 raises naming it (no hang)."""
  outputs = _two_processes(str(tmp_path / "ckpt"), "fail")
  for own, others in [("OSError: simulated disk failure on process 1", "process(es) [1] while writing shards"),
                      ("ConnectionError: simulated: no route", "process(es) [1] while planning"),
                      ("ValueError: simulated: shard fails its checksum", "restore from")]:
    assert f"RAISED {own}" in outputs[1], outputs[1][-2000:]
    assert others in outputs[0], outputs[0][-2000:]


def test_a_host_leaf_restores_onto_a_sharded_target_as_a_jax_array(tmp_path):
  mesh = jax.make_mesh((8,), ("a",))
  host = {"t": np.arange(16, dtype=np.float32), "n": np.int64(3)}  # int64: jax holds it only with x64
  ckpt.save(host, str(tmp_path / "c"))
  sharded = NamedSharding(mesh, P("a"))
  got = ckpt.restore(str(tmp_path / "c"), {"t": jax.ShapeDtypeStruct((16,), np.float32, sharding=sharded),
                                           "n": jax.ShapeDtypeStruct((), np.int64, sharding=NamedSharding(mesh, P()))})
  assert isinstance(got["t"], jax.Array) and got["t"].sharding == sharded
  np.testing.assert_array_equal(np.asarray(got["t"]), host["t"])
  assert isinstance(got["n"], np.ndarray) and got["n"] == 3
