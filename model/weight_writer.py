"""The checkpoint tensors of one `DeepseekV3` parameter, fetched from the devices only when their shard is written.

Each tensor is `(name, shape, dtype, produce)`: `produce()` gathers the value to the host
(across processes when it is sharded over several: a collective, so every process calls the
producers in the same order) and lays it out as the checkpoint stores it. With quantization,
DeepSeek's FP8 projections become e4m3 plus `weight_scale_inv` 128x128 block scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import fp8
from model import hf_names
from model.safetensors_files import dtype_code

BLOCK = 128
FP8 = np.dtype(jnp.float8_e4m3fn)


def checkpoint_tensors(value: jax.Array, source: hf_names.Source, quantize: bool) -> list[tuple]:
  """`(name, shape, dtype, produce)` for each checkpoint tensor of one parameter.

  Args:
    value: the parameter (`[E, ...]` stacked experts, an `[in, out]` kernel, or as stored).
    source: where it lives in the checkpoint.
    quantize: store `hf_names.is_quantizable` tensors in FP8 (values already FP8 are written as they are).
  """
  out = []
  stored_fp8 = np.dtype(value.dtype) == FP8
  for i, name in enumerate(source.names):
    def take(i=i):
      host = host_value(value[i] if source.stacked else value)
      return host.T if source.transposed else host
    shape = tuple(value.shape[1:]) if source.stacked else (
        tuple(reversed(value.shape)) if source.transposed else tuple(value.shape))
    if quantize and not stored_fp8 and hf_names.is_quantizable(name):
      part = _quantizer(take)
      out.append((name, shape, FP8, lambda part=part: part(0)))
      out.append((name + hf_names.SCALE_SUFFIX, tuple(-(-n // BLOCK) for n in shape), np.dtype(np.float32),
                  lambda part=part: part(1)))
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


def host_value(value: jax.Array) -> np.ndarray:
  """The whole array on this host (gathered across processes when sharded over several)."""
  if not isinstance(value, jax.Array) or value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))
