"""Sharded checkpoints of `jax.Array` pytrees on the storage cluster (`3fs://HOST:PORT/...`) or any fsspec path.

  storage.checkpoint.save(params, "3fs://127.0.0.1:9000/ckpt/step_100")
  params = storage.checkpoint.restore("3fs://127.0.0.1:9000/ckpt/step_100", abstract)  # any mesh

Layout of a checkpoint directory:
  manifest.json          written last: every leaf's key path, shape, dtype, the sharding it was
                         saved from, and per shard its index (start/stop per axis), file and xxh3-64
  {leaf}/{shard}.bin     one C-order array per distinct shard (replica 0 of it only)

`save` writes into `{path}.partial` (cleared first), every process writing its own addressable
shards concurrently (a thread pool over the filesystem's files: the cluster client stripes
each over its chains; a shard is copied to the host only when its write starts), then process
0 writes the manifest and renames the directory into place. After each phase the processes
agree: if one fails, all raise, rather than wait at a barrier for it. Committing: an old
checkpoint at `path` is renamed to `{path}.old` first and removed after. A crash before that
leaves `path` as it was; one between the two renames leaves the old checkpoint at
`{path}.old`, where `read_manifest` and `restore` find it. A directory without a manifest is
refused. With several processes, a local path must be on a filesystem they share.

`restore(path, target)` rebuilds each leaf on `target`'s sharding (a pytree of arrays or
`jax.ShapeDtypeStruct`s with shardings), reading only the saved shards that overlap each
device's slice (each once, concurrently, one leaf ahead) and checking their checksums, so the
mesh may differ from the one saved from.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from typing import Any, NamedTuple

import fsspec
import jax
import numpy as np
import xxhash
from jax.experimental import multihost_utils

MANIFEST = "manifest.json"
FORMAT = 1


def _fs(path: str):
  fs, root = fsspec.core.url_to_fs(path)
  return fs, root.rstrip("/")


def _leaf_names(tree) -> tuple[list[str], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
  return [[s.indices(n)[0], s.indices(n)[1]] for s, n in zip(index, shape)]


def _agree(phase: str, error: BaseException | None, what: str) -> None:
  """Every process calls this after a phase: all of them go on, or all of them raise.

  A process that failed re-raises its own error; the others raise naming the processes that
  failed, instead of waiting for them at the next barrier forever.
  """
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.array([error is not None], np.int32))
    failed = [int(p) for p in np.flatnonzero(np.asarray(failed).reshape(-1))]
  else:
    failed = [0] if error is not None else []
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"{what} failed on process(es) {failed} while {phase}; see their errors")


def _host_bytes(value) -> memoryview:
  """A shard's bytes in C order, as a view of one host copy (no second copy through `tobytes`)."""
  host = np.ascontiguousarray(np.asarray(value))
  return memoryview(host.reshape(-1).view(np.uint8))


def _plan(names, leaves) -> tuple[list[dict], list[tuple[int, str, Any]]]:
  """This process's manifest entries (without shard checksums yet) and its shard writes (leaf, file, value)."""
  entries, writes = [], []
  for i, (name, leaf) in enumerate(zip(names, leaves)):
    local_only = isinstance(leaf, jax.Array) and jax.process_count() > 1 and leaf.is_fully_addressable
    if isinstance(leaf, jax.Array) and not local_only:  # every process its addressable shards, one replica of each
      pieces = [(shard.index, shard.data) for shard in leaf.addressable_shards if shard.replica_id == 0]
      shape, dtype, sharding = leaf.shape, leaf.dtype, repr(leaf.sharding)
    else:  # a host value (numpy, a scalar, one process's own array): written by process 0
      host = np.asarray(leaf)
      if host.dtype.kind in "OUSV" or jax.dtypes.issubdtype(host.dtype, jax.dtypes.prng_key):
        raise ValueError(f"leaf {name} has dtype {host.dtype}, which is not numeric data (for PRNG keys save "
                         "jax.random.key_data)")
      pieces = [(tuple(slice(None) for _ in host.shape), host)] if jax.process_index() == 0 else []
      shape, dtype, sharding = host.shape, host.dtype, "host"
    for index, value in pieces:
      bounds = _bounds(index, shape)
      writes.append((i, f"{i}/" + ("_".join(f"{a}-{b}" for a, b in bounds) or "scalar") + ".bin", (bounds, value)))
    entries.append({"name": name, "shape": list(shape), "dtype": str(np.dtype(dtype)), "sharding": sharding,
                    "shards": []})
  return entries, writes


def save(tree, path: str, *, max_workers: int = 8) -> None:
  """Writes `tree` (a pytree of `jax.Array`s, numpy arrays or scalars) as a checkpoint at `path`; every process calls it.

  Each shard is copied to the host, checksummed and written inside the write pool, so a process
  holds about `max_workers` shards in host memory at a time, not its whole share of the tree.
  If any process fails, every process raises (none waits for the others forever).

  Args:
    tree: the pytree; each array leaf's shards are written by the processes that hold them.
    path: a local path or a URL fsspec knows (`3fs://HOST:PORT/dir` for the cluster).
    max_workers: concurrent shard writes per process.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  what = f"checkpoint save to {path}"
  error = None
  try:  # a failure here (a bad leaf, no connection) must not leave the other processes waiting
    fs, root = _fs(path)
    if not root.strip("/"):
      raise ValueError(f"path {path!r} is a filesystem's root; give a directory for the checkpoint")
    staging, old = root + ".partial", root + ".old"
    names, leaves, _ = _leaf_names(tree)
    entries, writes = _plan(names, leaves)
    if jax.process_index() == 0:
      if fs.exists(staging):
        fs.rm(staging, recursive=True)
      if fs.exists(old) and fs.exists(f"{root}/{MANIFEST}"):  # a finished commit's leftover
        fs.rm(old, recursive=True)
      fs.makedirs(staging, exist_ok=True)
  except Exception as err:  # noqa: BLE001 -- reported to every process by _agree
    error = err
  _agree("planning and clearing the staging directory", error, what)

  def write(item):
    leaf, file, (bounds, value) = item
    data = _host_bytes(value)
    fs.pipe_file(f"{staging}/{file}", data)
    return leaf, {"bounds": bounds, "file": file, "xxh3": xxhash.xxh3_64_hexdigest(data), "bytes": data.nbytes}

  try:
    for leaf in sorted({leaf for leaf, _, _ in writes}):
      fs.makedirs(f"{staging}/{leaf}", exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
      for leaf, shard in pool.map(write, writes):
        entries[leaf]["shards"].append(shard)
    fs.pipe_file(f"{staging}/shards.{jax.process_index()}.json", json.dumps(entries).encode())
  except Exception as err:  # noqa: BLE001
    error = err
  _agree("writing shards", error, what)

  try:
    if jax.process_index() == 0:
      _commit(fs, root, staging, old)
  except Exception as err:  # noqa: BLE001
    error = err
  _agree("committing", error, what)


def _commit(fs, root: str, staging: str, old: str) -> None:
  """Process 0: merges the processes' shard lists into the manifest, then renames the checkpoint into place."""
  merged = None
  for p in range(jax.process_count()):
    part = json.loads(fs.cat_file(f"{staging}/shards.{p}.json"))
    if merged is None:
      merged = part
    else:
      for entry, more in zip(merged, part):
        entry["shards"] += more["shards"]
    fs.rm_file(f"{staging}/shards.{p}.json")
  for entry in merged:
    bounds = [json.dumps(shard["bounds"]) for shard in entry["shards"]]
    if len(set(bounds)) != len(bounds):
      raise ValueError(f"leaf {entry['name']}: two processes wrote the same shard")
  fs.pipe_file(f"{staging}/{MANIFEST}", json.dumps({"format": FORMAT, "leaves": merged}, indent=1).encode())
  # The old checkpoint moves to `{root}.old` (where `read_manifest` looks when `root` has none)
  # for the instant between the two renames; on local disks and on 3fs `mv` is a rename.
  if fs.exists(root):
    if fs.exists(old):
      fs.rm(old, recursive=True)
    fs.mv(root, old, recursive=True)
  fs.mv(staging, root, recursive=True)
  if fs.exists(old):
    fs.rm(old, recursive=True)


def read_manifest(path: str) -> dict:
  """The checkpoint's manifest; ValueError when `path` holds none (an unfinished save, or no checkpoint)."""
  fs, root = _fs(path)
  for directory in (root, root + ".old"):  # `.old`: a save stopped between its two renames
    try:
      manifest = json.loads(fs.cat_file(f"{directory}/{MANIFEST}"))
    except FileNotFoundError:
      continue
    if manifest.get("format") != FORMAT:
      raise ValueError(f"{directory}/{MANIFEST} has format {manifest.get('format')}, this reader {FORMAT}")
    manifest["directory"] = directory
    return manifest
  raise ValueError(f"{path} is not a finished checkpoint: it has no {MANIFEST}")


def _overlap(want: list[list[int]], have: list[list[int]]):
  """The (lo, hi) corners of two boxes' intersection, or None when they do not meet (a scalar always does)."""
  lo = [max(a, c) for (a, _), (c, _) in zip(want, have)]
  hi = [min(b, d) for (_, b), (_, d) in zip(want, have)]
  return None if any(l >= h for l, h in zip(lo, hi)) else (lo, hi)


def _read_shard(fs, root: str, name: str, shard: dict, dtype: np.dtype) -> np.ndarray:
  data = fs.cat_file(f"{root}/{shard['file']}")
  if xxhash.xxh3_64_hexdigest(data) != shard["xxh3"]:
    raise ValueError(f"leaf {name}: shard {shard['file']} fails its checksum")
  return np.frombuffer(data, dtype).reshape([b - a for a, b in shard["bounds"]])


class _LeafPlan(NamedTuple):
  name: str
  entry: dict
  shape: tuple[int, ...]
  dtype: np.dtype
  sharding: Any  # None: the leaf comes back as numpy
  slices: list[tuple[slice, ...]]  # this process's slices of it
  needed: list[dict]  # the saved shards those slices overlap


def _restore_plan(name: str, leaf, entry: dict) -> _LeafPlan:
  shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
  leaf_dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)  # a Python scalar has none
  if tuple(np.shape(leaf)) != shape or leaf_dtype != dtype:
    raise ValueError(f"leaf {name}: checkpoint has {dtype}{list(shape)}, target {leaf_dtype}{list(np.shape(leaf))}")
  sharding = getattr(leaf, "sharding", None)
  x64_only = jax.dtypes.canonicalize_dtype(dtype) != dtype
  if sharding is None or (entry["sharding"] == "host" and x64_only):  # numpy (jax could not hold an int64)
    sharding, slices = None, [tuple(slice(None) for _ in shape)]
  else:
    if x64_only:
      raise ValueError(f"leaf {name} is {dtype}, which jax holds only with jax_enable_x64 on")
    slices = list(sharding.addressable_devices_indices_map(shape).values())
  wanted = [_bounds(index, shape) for index in slices]
  needed = [shard for shard in entry["shards"] if any(_overlap(w, shard["bounds"]) is not None for w in wanted)]
  return _LeafPlan(name, entry, shape, dtype, sharding, slices, needed)


def _fill(plan: _LeafPlan, cache: dict[str, np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
  """The slice `index` of the leaf, cut from the saved shards in `cache`."""
  want = _bounds(index, plan.shape)
  result = np.empty([b - a for a, b in want], plan.dtype)
  covered = 0
  for shard in plan.entry["shards"]:
    overlap = _overlap(want, shard["bounds"])
    if overlap is None:
      continue  # this shard holds none of the slice (never for a scalar: no axes)
    lo, hi = overlap
    src = cache[shard["file"]][tuple(slice(l - c, h - c) for l, h, (c, _) in zip(lo, hi, shard["bounds"]))]
    result[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, want))] = src
    covered += src.size
  if covered != result.size:
    raise ValueError(f"leaf {plan.name}: the saved shards cover {covered} of {result.size} elements of the slice "
                     f"{want}")
  return result


def restore(path: str, target, *, max_workers: int = 8):
  """Reads the checkpoint at `path` onto `target`'s structure, shapes, dtypes and shardings.

  Args:
    path: a local path or an fsspec URL, as given to `save`.
    target: a pytree like the saved one, of `jax.Array`s or `jax.ShapeDtypeStruct`s; each leaf's
      `.sharding` says where its shards go. Targets without a sharding come back as numpy
      arrays, and so do 64-bit host values (numpy, scalars) when jax_enable_x64 is off.
    max_workers: concurrent shard reads. Only the saved shards that overlap this process's
      slices are read, each once, one leaf ahead of the one being built.

  Returns:
    The pytree: `jax.Array`s, and numpy arrays as above. ValueError names the leaf whose name,
    shape or dtype differs from the manifest's, or a shard whose checksum fails. With
    shardings that span processes, a failure on one process raises on all of them.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  leaves = jax.tree_util.tree_leaves(target)
  # Onto shardings that span processes, every process restores together: agree on the outcome,
  # so one process's failure (a bad shard, a lost connection) does not leave the others stuck in
  # their next collective. A restore onto this process's devices alone stays local.
  spans = any(getattr(leaf, "sharding", None) is not None and not leaf.sharding.is_fully_addressable
              for leaf in leaves)
  result, error = None, None
  try:
    result = _restore(path, target, max_workers)
  except Exception as err:  # noqa: BLE001 -- reported to every process by _agree
    if not spans:
      raise
    error = err
  if spans:
    _agree("restoring", error, f"checkpoint restore from {path}")
  return result


def _restore(path: str, target, max_workers: int):
  fs, _ = _fs(path)
  manifest = read_manifest(path)
  root = manifest["directory"]
  names, leaves, treedef = _leaf_names(target)
  saved = {entry["name"]: entry for entry in manifest["leaves"]}
  if sorted(saved) != sorted(names):
    missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
    raise ValueError(f"{path} holds other leaves than target: missing {missing[:5]}, not in target {extra[:5]}")
  plans = [_restore_plan(name, leaf, saved[name]) for name, leaf in zip(names, leaves)]  # checks every leaf first
  out = []
  with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
    def start_reads(plan: _LeafPlan) -> dict[str, concurrent.futures.Future]:
      return {shard["file"]: pool.submit(_read_shard, fs, root, plan.name, shard, plan.dtype) for shard in plan.needed}

    # One leaf ahead: the next leaf's shards are read while this one's arrays are cut, so host
    # memory holds about two leaves' shards.
    reads = start_reads(plans[0]) if plans else {}
    for k, plan in enumerate(plans):
      cache = {file: future.result() for file, future in reads.items()}
      reads = start_reads(plans[k + 1]) if k + 1 < len(plans) else {}
      fill = functools.partial(_fill, plan, cache)
      out.append(fill(plan.slices[0]) if plan.sharding is None else
                 jax.make_array_from_callback(plan.shape, plan.sharding, fill))
  return jax.tree_util.tree_unflatten(treedef, out)
