"""Builds one `DeepseekV3` parameter from checkpoint tensors, device slice by device slice.

Each distinct device slice is read once (replicas are copied device to device), straight into
one preallocated host buffer of the parameter's dtype: routed experts are filled expert by
expert, FP8 weights are dequantized 128-row band by band, so host memory holds one device slice
plus one FP8 tensor slice and a band's float32 temporaries, never a model copy.
Linear weights are stored `[out, in]` and held here `[in, out]`: the device transposes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from model import hf_names
from model.safetensors_files import DTYPES, CheckpointFiles

BLOCK = 128  # DeepSeek's FP8 weight blocks are 128 x 128
FP8 = np.dtype(jnp.float8_e4m3fn)


def load_parameter(files: CheckpointFiles, source: hf_names.Source, shape: tuple[int, ...], dtype,
                   target: jax.sharding.Sharding) -> jax.Array:
  """The parameter of `shape` and `dtype` (float8_e4m3fn: kept as stored) placed with `target`.

  ValueError, naming the tensor and its file, when a tensor's shape is not the expected one.
  """
  shape, dtype = tuple(shape), np.dtype(dtype)
  stored = shape[1:] if source.stacked else (shape[::-1] if source.transposed else shape)
  for name in source.names:
    info = files.info(name)
    if info.shape != stored:
      raise ValueError(f"tensor {name} in {info.file} has shape {info.shape}, expected {stored}")

  def read(index):
    """The slice as stored: a transposed parameter's slice comes untransposed."""
    if source.stacked:
      experts = range(*index[0].indices(shape[0]))
      rest = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index[1:], shape[1:]))
      out = np.empty((len(experts), *(s.stop - s.start for s in rest)), dtype)
      for j, expert in enumerate(experts):
        _read_into(out[j], files, source.names[expert], rest)
      return out
    index = (index[1], index[0]) if source.transposed else index
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, stored))
    info = files.info(source.names[0])
    if info.dtype != "F8_E4M3" and np.dtype(DTYPES[info.dtype]) == dtype:
      return files.read(source.names[0], index)  # as stored: no second buffer
    out = np.empty(tuple(s.stop - s.start for s in index), dtype)
    _read_into(out, files, source.names[0], index)
    return out

  by_slice: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in target.addressable_devices_indices_map(shape).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    by_slice.setdefault(key, (index, []))[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    first = jax.device_put(read(index), devices[0])
    if source.transposed:  # the device's work, not numpy's; once per slice, then copied
      first = first.T
    shards.append(first)
    shards.extend(jax.device_put(first, device) for device in devices[1:])
  return jax.make_array_from_single_device_arrays(shape, target, shards)


def _read_into(out: np.ndarray, files: CheckpointFiles, name: str, index: tuple[slice, ...]) -> None:
  """Fills `out` with `name[index]` (step-1 slices with explicit bounds), converting to out's dtype.

  FP8 tensors go into an FP8 `out` as stored; into a float `out` they are dequantized with their
  `{name}_scale_inv` blocks, one 128-row band at a time.
  """
  info = files.info(name)
  scale_name = name + hf_names.SCALE_SUFFIX
  if out.dtype == FP8:
    if info.dtype != "F8_E4M3":
      raise ValueError(f"tensor {name} in {info.file} is {info.dtype}; an FP8 projection needs F8_E4M3")
    out[...] = files.read(name, index)
    return
  if info.dtype != "F8_E4M3":
    if scale_name in files:
      logging.warning("tensor %s in %s is %s, not FP8: its %s is ignored", name, info.file, info.dtype, scale_name)
    out[...] = files.read(name, index)
    return
  if scale_name not in files:
    raise ValueError(f"tensor {name} in {info.file} is FP8 but the checkpoint has no {scale_name}")
  if len(info.shape) != 2:
    raise ValueError(f"tensor {name} in {info.file} is FP8 with shape {info.shape}; block scales need 2 axes")
  scale_info = files.info(scale_name)
  blocks = tuple(-(-n // BLOCK) for n in info.shape)
  if scale_info.shape != blocks:
    raise ValueError(f"tensor {scale_name} in {scale_info.file} has shape {scale_info.shape}, expected {blocks} "
                     f"(one scale per {BLOCK}x{BLOCK} block of {name} {info.shape})")
  (r0, r1), (c0, c1) = ((s.start, s.stop) for s in index)
  scales = files.read(scale_name, (slice(r0 // BLOCK, -(-r1 // BLOCK)), slice(c0 // BLOCK, -(-c1 // BLOCK))))
  data = files.read(name, index)  # 1 byte per element
  columns = np.repeat(np.arange(scales.shape[1]), BLOCK)[c0 % BLOCK:c0 % BLOCK + c1 - c0]  # scale column of each
  row = r0
  while row < r1:
    band_end = min(r1, (row // BLOCK + 1) * BLOCK)  # rows sharing one row of scales
    band = data[row - r0:band_end - r0].astype(np.float32)
    band *= scales[row // BLOCK - r0 // BLOCK, columns].astype(np.float32)
    out[row - r0:band_end - r0] = band
    row = band_end
