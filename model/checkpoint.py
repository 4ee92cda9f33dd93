"""Hugging Face / DeepSeek-V3 safetensors checkpoints: `from_pretrained` and `save_pretrained`.

```python
m = model.from_pretrained(path, dtype=jnp.bfloat16, mesh=None)   # a DeepseekV3
logits = m(tokens)                                                 # [batch, seq] -> [batch, seq, vocab]
model.save_pretrained(m, path)
```

Loading streams: every parameter is assembled device shard by device shard, each read as only
the slice of the checkpoint tensor(s) that device holds (once for all the devices that hold
the same slice), so host memory holds one device shard at a time, never a copy of the model. Routed experts, one tensor per
expert in the checkpoint, are stacked per device shard. On a mesh with an `ep` axis each device
reads only its own experts (`model.sharding`).

FP8 checkpoints (DeepSeek-V3's own: e4m3 weights with `weight_scale_inv` in 128x128 blocks) are
dequantized slice by slice into `dtype`. Saving writes `dtype`-precision tensors, or with
`fp8=True` quantizes the projections DeepSeek quantizes (`hf_names.is_quantizable`) into the
same FP8 format, with its `quantization_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

import fp8
from model import hf_names, sharding
from model.config import ModelConfig
from model.safetensors_files import CheckpointFiles, dtype_code, write_shards
from model.transformer import DeepseekV3

BLOCK = 128  # DeepSeek's FP8 weight blocks are 128 x 128
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, mesh: Mesh | None = None,
                    fp8_weights: bool = False, mtp: bool | None = None,
                    config: ModelConfig | None = None) -> DeepseekV3:
  """Loads a Hugging Face DeepSeek-V3 (or V2) safetensors directory into a `DeepseekV3`.

  Args:
    path: a directory with `config.json` and `model.safetensors.index.json` plus its shards (or
      one `model.safetensors`).
    dtype: the parameters' and activations' dtype (the MoE score bias stays float32). FP8
      weights are dequantized into it.
    mesh: where to place the parameters (`model.sharding`: experts over `ep`, the rest
      replicated); None: the default device.
    fp8_weights: keep an FP8 checkpoint's projections in FP8 as stored, with their scales, and
      run them through FP8 GEMMs (`DeepseekV3(fp8_weights=True)`, inference only). False:
      dequantize them into dtype.
    mtp: load the MTP modules. None: load them when the checkpoint has them, else build the
      model without MTP and log that (transformers saves no MTP layers). True: they must be there.
    config: overrides `config.json`.

  Returns:
    The model. ValueError, naming the tensor and its file, for a missing tensor, a wrong shape,
    a dtype a weight cannot have, or a truncated file.
  """
  path = os.fspath(path)
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")
  config = ModelConfig.from_hf(path) if config is None else config
  with CheckpointFiles(path) as files:
    config = _with_mtp(config, files, mtp, path)
    quantized = _check_quantization(path)
    if fp8_weights and not quantized:
      raise ValueError(f"fp8_weights=True needs an FP8 checkpoint; {path}/config.json has no quantization_config "
                       "(write one with save_pretrained(..., fp8=True))")
    abstract = nnx.eval_shape(lambda: DeepseekV3(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                                 fp8_weights=fp8_weights))
    graphdef, state = nnx.split(abstract)
    leaves, used = [], set(hf_names.mtp_copies(config))
    for state_path, variable in nnx.to_flat_state(state):
      spec = variable.get_value()
      source = hf_names.source(state_path, config)
      target = _sharding(state_path, spec.shape, mesh)
      value = _load(files, source, spec.shape, spec.dtype, target)
      leaves.append((state_path, variable.replace(value)))
      used.update(source.names)
      used.update(name + hf_names.SCALE_SUFFIX for name in source.names)
    unused = sorted(files.names() - used, key=_natural_key)
    if unused:
      logging.warning("%s: %d checkpoint tensors are not part of this model and were not loaded: %s%s", path,
                      len(unused), ", ".join(unused[:5]), ", ..." if len(unused) > 5 else "")
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_pretrained(model: DeepseekV3, path: str | os.PathLike, *, fp8: bool = False,
                    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
  """Writes `model` as a Hugging Face DeepSeek-V3 checkpoint: `config.json`, safetensors shards, the index.

  The tensors carry DeepSeek's names and layouts, MTP depth k as `model.layers.{L + k}` with
  copies of the embedding and the head (DeepSeek's format), so that transformers, vLLM or
  DeepSeek's own code read it.

  Args:
    model: the model; its parameters may be sharded (every process calls this; process 0 writes).
    path: the directory to create. It is written beside, then renamed into place.
    fp8: store the projections `hf_names.is_quantizable` names in e4m3 with 128x128 block
      scales (`weight_scale_inv`), as DeepSeek-V3's own checkpoint.
    max_shard_bytes: the largest shard file (host memory holds one shard while it is written).
    overwrite: replace an existing `path`; otherwise an existing non-empty one is an error.
  """
  path = os.fspath(path).rstrip(os.sep)
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise ValueError(f"path {path} exists and is not empty; pass overwrite=True to replace it")
  config = model.config
  tensors = []
  for state_path, variable in nnx.to_flat_state(nnx.state(model)):
    tensors.extend(_tensors(variable.get_value(), hf_names.source(state_path, config), fp8))
  by_name = {name: (shape, dtype, produce) for name, shape, dtype, produce in tensors}
  for copy, original in hf_names.mtp_copies(config).items():
    tensors.append((copy, *by_name[original]))
  tensors.sort(key=lambda t: _natural_key(t[0]))
  writer = jax.process_index() == 0
  parent = os.path.dirname(os.path.abspath(path))
  staging = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent) if writer else None
  try:
    if writer:
      write_shards(staging, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
      hf = config.to_hf()
      hf["torch_dtype"] = str(np.dtype(model.embed_tokens.embedding[...].dtype))
      if fp8 or any(np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn) for _, _, dtype, _ in tensors):
        hf["quantization_config"] = dict(QUANTIZATION_CONFIG)
      with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    else:  # the gathers are collective: every process produces every tensor
      for _, _, _, produce in tensors:
        produce()
    if writer:
      if os.path.exists(path):
        shutil.rmtree(path)
      os.rename(staging, path)
      staging = None
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)


def _with_mtp(config: ModelConfig, files: CheckpointFiles, mtp: bool | None, path: str) -> ModelConfig:
  prefixes = hf_names.mtp_prefixes(config)
  if mtp is False or (mtp is None and prefixes and not any(n.startswith(prefixes) for n in files.names())):
    if prefixes and mtp is None:
      logging.warning("%s has no MTP layers (%s...): the model is built without MTP modules", path, prefixes[0])
    return dataclasses.replace(config, num_nextn_predict_layers=0)
  return config


def _check_quantization(path: str) -> bool:
  """Whether config.json declares DeepSeek's FP8 format; ValueError for any other quantization."""
  with open(os.path.join(path, "config.json")) as f:
    quant = json.load(f).get("quantization_config")
  if quant is None:
    return False
  if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3" or \
      list(quant.get("weight_block_size", [BLOCK, BLOCK])) != [BLOCK, BLOCK]:
    raise ValueError(f"{path}/config.json has quantization_config {quant}: only fp8 e4m3 with 128x128 weight "
                     "blocks (DeepSeek-V3's) is supported")
  return True


def _sharding(state_path, shape, mesh):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return sharding.named_sharding(state_path, shape, mesh)


def _load(files: CheckpointFiles, source: hf_names.Source, shape, dtype, target) -> jax.Array:
  """One parameter, built device shard by device shard from the checkpoint."""
  tensor_shape = tuple(shape[1:]) if source.stacked else (tuple(reversed(shape)) if source.transposed else tuple(shape))
  for name in source.names:
    info = files.info(name)
    if info.shape != tensor_shape:
      raise ValueError(f"tensor {name} in {info.file} has shape {info.shape}, expected {tensor_shape}")

  stored_fp8 = np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn)  # kept as stored, not dequantized
  reader = _read_fp8 if stored_fp8 else _read_float

  def read(index):
    """The slice as stored: a transposed parameter's slice comes untransposed (the device transposes it)."""
    if source.stacked:
      experts = range(*index[0].indices(shape[0]))
      block = np.stack([reader(files, source.names[e], index[1:]) for e in experts])
    elif source.transposed:
      block = reader(files, source.names[0], (index[1], index[0]))
    else:
      block = reader(files, source.names[0], index)
    return np.ascontiguousarray(block.astype(dtype, copy=False))

  # Devices holding the same slice (replicas) share one read; host memory holds one slice at a time.
  by_slice: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in target.addressable_devices_indices_map(tuple(shape)).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    by_slice.setdefault(key, (index, []))[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    first = jax.device_put(read(index), devices[0])
    if source.transposed:  # the device's work, not numpy's; once per slice, then copied
      first = first.T
    shards.append(first)
    shards.extend(jax.device_put(first, device) for device in devices[1:])
  return jax.make_array_from_single_device_arrays(tuple(shape), target, shards)


def _read_fp8(files: CheckpointFiles, name: str, index: tuple[slice, ...]) -> np.ndarray:
  info = files.info(name)
  if info.dtype != "F8_E4M3":
    raise ValueError(f"tensor {name} in {info.file} is {info.dtype}; an FP8 projection needs F8_E4M3")
  return files.read(name, index)


def _read_float(files: CheckpointFiles, name: str, index: tuple[slice, ...]) -> np.ndarray:
  """A slice of a weight, FP8 ones dequantized with their `{name}_scale_inv` blocks (float32 then)."""
  info = files.info(name)
  index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, info.shape))
  data = files.read(name, index)
  if info.dtype != "F8_E4M3":
    return data
  scale_name = name + hf_names.SCALE_SUFFIX
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
  spread = np.repeat(np.repeat(scales.astype(np.float32), BLOCK, 0), BLOCK, 1)
  spread = spread[r0 % BLOCK:r0 % BLOCK + r1 - r0, c0 % BLOCK:c0 % BLOCK + c1 - c0]
  return data.astype(np.float32) * spread


def _tensors(value: jax.Array, source: hf_names.Source, quantize: bool):
  """`(name, shape, dtype, produce)` of each checkpoint tensor of one parameter (produce fetches it then)."""
  pieces = []
  for i, name in enumerate(source.names):
    def take(i=i):
      host = _host(value[i] if source.stacked else value)
      return host.T if source.transposed else host
    shape = tuple(value.shape[1:]) if source.stacked else (
        tuple(reversed(value.shape)) if source.transposed else tuple(value.shape))
    pieces.append((name, shape, take))
  out = []
  stored_fp8 = np.dtype(value.dtype) == np.dtype(jnp.float8_e4m3fn)  # written as is, its scales beside it
  for name, shape, take in pieces:
    if quantize and not stored_fp8 and hf_names.is_quantizable(name):
      part = _quantizer(take)
      blocks = tuple(-(-n // BLOCK) for n in shape)
      out.append((name, shape, np.dtype(jnp.float8_e4m3fn), lambda part=part: part(0)))
      out.append((name + hf_names.SCALE_SUFFIX, blocks, np.dtype(np.float32), lambda part=part: part(1)))
    else:
      dtype = np.dtype(value.dtype)
      dtype_code(dtype)  # ValueError now for a dtype safetensors here cannot hold
      out.append((name, shape, dtype, take))
  return out


def _quantizer(take):
  """`part(i)`: the quantized weight (0) or its scales (1), quantizing once and forgetting each part once taken."""
  memo = {}

  def part(i):
    if not memo:
      weight, scale = fp8.quantize_per_block(jnp.asarray(take(), jnp.float32))
      memo.update({0: np.asarray(weight), 1: np.asarray(scale, np.float32)})
    return memo.pop(i)
  return part


def _host(value: jax.Array) -> np.ndarray:
  """The whole array on this host (gathered across processes when sharded over several)."""
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in name.split(".")]
