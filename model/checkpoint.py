"""Hugging Face / DeepSeek-V3 safetensors checkpoints: `from_pretrained` and `save_pretrained`.

```python
m = model.from_pretrained(path, dtype=jnp.bfloat16, mesh=None)   # a DeepseekV3
logits = m(tokens)                                                 # [batch, seq] -> [batch, seq, vocab]
model.save_pretrained(m, path)
```

Loading streams (`model.weight_reader`): every parameter is assembled device shard by device
shard, each read as only the slice of the checkpoint tensor(s) that device holds (once for all
the devices that hold the same slice), straight into one buffer of the parameter's dtype, so
host memory holds one device shard at a time, never a copy of the model. Routed experts, one tensor per
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

from model import hf_names, sharding
from model.config import ModelConfig
from model.safetensors_files import INDEX, CheckpointFiles, write_shards
from model.transformer import DeepseekV3
from model.weight_reader import BLOCK, load_parameter
from model.weight_writer import checkpoint_tensors
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
  if mtp not in (None, True, False):
    raise ValueError(f"mtp must be None, True or False, got {mtp!r}")
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
      value = load_parameter(files, source, spec.shape, spec.dtype, target)
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

  The checkpoint is written into a staging directory beside `path` and renamed into place, so
  `path` holds either the old checkpoint or the new one. Other files already in `path` (a
  tokenizer, say) are carried over.

  Args:
    model: the model; its parameters may be sharded. With several processes every process
      calls this (the gathers are collective), process 0 writes, and all return once it is in place.
    path: the directory.
    fp8: store the projections `hf_names.is_quantizable` names in e4m3 with 128x128 block
      scales (`weight_scale_inv`), as DeepSeek-V3's own checkpoint.
    max_shard_bytes: the largest shard file (host memory holds one shard while it is written).
    overwrite: replace an existing checkpoint at `path`; otherwise a non-empty `path` is an error.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise ValueError(f"path {path} exists and is not empty; pass overwrite=True to replace it")
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  config = model.config
  tensors = []
  for state_path, variable in nnx.to_flat_state(nnx.state(model)):
    tensors.extend(checkpoint_tensors(variable.get_value(), hf_names.source(state_path, config), fp8))
  by_name = {name: (shape, dtype, produce) for name, shape, dtype, produce in tensors}
  for copy, original in hf_names.mtp_copies(config).items():
    tensors.append((copy, *by_name[original]))
  tensors.sort(key=lambda t: _natural_key(t[0]))
  produced = [False] * len(tensors)
  tensors = [(name, shape, dtype, _marking(produce, produced, i))
             for i, (name, shape, dtype, produce) in enumerate(tensors)]
  hf = config.to_hf()
  hf["torch_dtype"] = str(np.dtype(model.embed_tokens.embedding[...].dtype))
  if fp8 or any(np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn) for _, _, dtype, _ in tensors):
    hf["quantization_config"] = dict(QUANTIZATION_CONFIG)
  error = None
  if jax.process_index() == 0:
    try:
      _write(path, tensors, hf, max_shard_bytes)
    except BaseException as err:  # the other processes still gather every tensor: keep step with them
      error = err
  for i, (_, _, _, produce) in enumerate(tensors):
    if not produced[i] and (jax.process_index() != 0 or jax.process_count() > 1):
      produce()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_pretrained {path}")
  if error is not None:
    raise error


def _marking(produce, produced: list, i: int):
  def wrapped():
    produced[i] = True
    return produce()
  return wrapped


def _write(path: str, tensors: list, hf_config: dict, max_shard_bytes: int) -> None:
  """Process 0: stages the checkpoint beside `path`, then swaps it in (old one renamed aside, then removed)."""
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
  aside = None
  try:
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint is for others to read too
    write_shards(staging, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    for entry in os.listdir(staging):  # safetensors creates its files 0600
      os.chmod(os.path.join(staging, entry), 0o666 & ~_umask())
    if os.path.exists(path):
      for entry in os.listdir(path):  # a tokenizer, a README: not this checkpoint's to drop
        if entry not in os.listdir(staging) and not entry.endswith(".safetensors") and entry != INDEX:
          source = os.path.join(path, entry)
          (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(staging, entry))
      aside = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
      os.rename(path, os.path.join(aside, "old"))
    os.rename(staging, path)
    staging = None
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
    if aside is not None:
      if staging is not None and not os.path.exists(path):  # the swap failed halfway: put the old one back
        os.rename(os.path.join(aside, "old"), path)
      shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _with_mtp(config: ModelConfig, files: CheckpointFiles, mtp: bool | None, path: str) -> ModelConfig:
  prefixes = hf_names.mtp_prefixes(config)
  if mtp is True and not prefixes:
    raise ValueError(f"mtp=True, but {path}'s config has num_nextn_predict_layers=0")
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
    return SingleDeviceSharding(jax.local_devices()[0])
  return sharding.named_sharding(state_path, shape, mesh)


def _natural_key(name: str):
  """Sorts `layers.10` after `layers.9`; numbers before words in the same position."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]
