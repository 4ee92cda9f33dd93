"""A directory of safetensors shards: read one tensor (or one slice of it) at a time, and write shards.

Reading goes through the `safetensors` package (memory-mapped, sliced), except for FP8
tensors: its numpy reader has no float8 dtype (it looks for `numpy.float8_e4m3fn`), so those
are memory-mapped here from the header's offsets and viewed as `ml_dtypes.float8_e4m3fn`.
Every header is parsed here first, so that a bad file fails with a `ValueError` naming the
file and the tensor: a tensor the index promises but the file lacks, an unknown dtype, a
shape that is not the one expected, bytes cut off by truncation.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np
import safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The dtypes a DeepSeek-V3 weight can have, by safetensors code.
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MEMMAPPED = ("F8_E4M3",)  # safetensors' numpy reader cannot build these


class TensorInfo(NamedTuple):
  file: str  # the shard's path
  dtype: str  # safetensors code, e.g. "BF16"
  shape: tuple[int, ...]
  start: int  # byte offset of the data in the file
  end: int


class CheckpointFiles:
  """The tensors of a checkpoint directory (`model.safetensors.index.json` and its shards, or one `model.safetensors`).

  Args:
    path: the directory.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    index = os.path.join(self.path, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
      self._where = {name: os.path.join(self.path, file) for name, file in weight_map.items()}
      self._origin = index
    elif os.path.exists(os.path.join(self.path, SINGLE)):
      self._where = None  # filled from the one header
      self._origin = os.path.join(self.path, SINGLE)
    else:
      raise ValueError(f"{self.path} holds neither {INDEX} nor {SINGLE}")
    self._headers: dict[str, dict[str, TensorInfo]] = {}
    self._readers: dict[str, safetensors.safe_open] = {}
    if self._where is None:
      self._where = {name: self._origin for name in self._header(self._origin)}

  def names(self) -> set[str]:
    """Every tensor name the index (or the single file) lists."""
    return set(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def info(self, name: str) -> TensorInfo:
    """Where `name` is and what it holds; ValueError if it is missing, of an unknown dtype, or its file is truncated."""
    if name not in self._where:
      raise ValueError(f"tensor {name} is missing: {self._origin} does not list it")
    file = self._where[name]
    if not os.path.exists(file):
      raise ValueError(f"tensor {name} is missing: {self._origin} puts it in {file}, which does not exist")
    header = self._header(file)
    if name not in header:
      raise ValueError(f"tensor {name} is missing from {file}, where {self._origin} puts it")
    info = header[name]
    if info.dtype not in DTYPES:
      raise ValueError(f"tensor {name} in {file} has dtype {info.dtype}, which is not a weight dtype "
                       f"(expected one of {sorted(DTYPES)})")
    return info

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor `name`, or its `index` (a tuple of slices, one per axis), as a numpy array in its stored dtype."""
    info = self.info(name)
    index = tuple(slice(None) for _ in info.shape) if index is None else index
    if info.dtype in _MEMMAPPED:
      data = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
      return np.array(data.view(DTYPES[info.dtype]).reshape(info.shape)[index])
    try:
      reader = self._reader(info.file)
      if not info.shape:
        return np.asarray(reader.get_tensor(name))
      return np.asarray(reader.get_slice(name)[index])
    except safetensors.SafetensorError as err:
      raise ValueError(f"tensor {name} in {info.file} cannot be read: {err}") from err

  def close(self) -> None:
    for reader in self._readers.values():
      reader.__exit__(None, None, None)
    self._readers.clear()

  def __enter__(self) -> "CheckpointFiles":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _reader(self, file: str):
    if file not in self._readers:
      reader = safetensors.safe_open(file, framework="numpy", backend="pread")
      self._readers[file] = reader.__enter__()
    return self._readers[file]

  def _header(self, file: str) -> dict[str, TensorInfo]:
    if file not in self._headers:
      self._headers[file] = read_header(file)
    return self._headers[file]


def read_header(file: str) -> dict[str, TensorInfo]:
  """Parses a safetensors header (8-byte little-endian length, then JSON); ValueError naming the file if it is cut or bad."""
  if not os.path.exists(file):
    raise ValueError(f"{file} does not exist")
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
    length = int.from_bytes(prefix, "little")
    if length > size - 8:
      raise ValueError(f"{file} is truncated: its header needs {length} bytes, {size - 8} remain")
    try:
      header = json.loads(f.read(length))
    except ValueError as err:
      raise ValueError(f"{file} has a corrupt safetensors header: {err}") from err
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      begin, end = (int(x) for x in entry["data_offsets"])
      info = TensorInfo(file, str(entry["dtype"]), tuple(int(n) for n in entry["shape"]), 8 + length + begin,
                        8 + length + end)
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f"tensor {name} in {file} has a corrupt header entry {entry!r}") from err
    if begin < 0 or end < begin or any(n < 0 for n in info.shape) or (
        info.dtype in DTYPES and end - begin != int(np.prod(info.shape, dtype=np.int64)) * DTYPES[info.dtype].itemsize):
      raise ValueError(f"tensor {name} in {file} has a corrupt header entry: {info.dtype} {list(info.shape)} "
                       f"does not fill its bytes [{begin}, {end})")
    out[name] = info
  cut = sorted((info.end, name) for name, info in out.items() if info.end > size)
  if cut:  # safetensors refuses the whole file then, so every tensor in it is named by the first cut one
    end, name = cut[0]
    raise ValueError(f"tensor {name} in {file} is truncated: its data ends at byte {end}, the file has {size} "
                     f"({len(cut)} tensor(s) cut)")
  return out


def write_shards(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None = None) -> dict[str, str]:
  """Writes tensors into `model-0000i-of-0000n.safetensors` shards and the index; returns the weight map.

  Args:
    path: an existing directory.
    tensors: `(name, shape, dtype, produce)`; `produce()` makes the numpy array when its shard is
      written, so host memory holds one shard at a time.
    max_shard_bytes: a new shard starts before a tensor that would push the current one past this.
    metadata: the files' `__metadata__` (transformers requires `{"format": "pt"}`).

  Returns:
    `{tensor name: file name}`, as written to `model.safetensors.index.json`.
  """
  shards: list[list] = [[]]
  shard_bytes = 0
  total = 0
  for entry in tensors:
    nbytes = int(np.prod(entry[1], dtype=np.int64)) * np.dtype(entry[2]).itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(entry)
    shard_bytes += nbytes
    total += nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    arrays, specs = [], {}
    for name, shape, dtype, produce in shard:
      array = np.ascontiguousarray(produce())
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name} came out {array.dtype} {array.shape}, planned {np.dtype(dtype)} {shape}")
      arrays.append(array)  # keeps the buffer alive while safetensors writes from its pointer
      specs[name] = safetensors.TensorSpec(dtype=array.dtype.name, shape=array.shape, data_ptr=array.ctypes.data,
                                           data_len=array.nbytes)
      weight_map[name] = file
    safetensors.serialize_file(specs, os.path.join(path, file), metadata)
    del arrays, specs
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  return weight_map


def dtype_code(dtype) -> str:
  """The safetensors code of a numpy dtype; ValueError for one a weight cannot have."""
  dtype = np.dtype(dtype)
  if dtype not in _CODES:
    raise ValueError(f"cannot store {dtype} weights (safetensors codes here: {sorted(DTYPES)})")
  return _CODES[dtype]
