"""Argument checks shared by the dispatch functions: ValueError naming the argument, once, before tracing."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

import ffi.dispatch
from fp8.formats import BLOCK

X_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float16)


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def array(name: str, value) -> jax.Array:
  return value if isinstance(value, jax.Array) else jnp.asarray(value)


def check_topk(topk_idx, num_experts: int, num_ranks: int) -> jax.Array:
  """`[T, K]` int32 global expert ids in [-1, num_experts); experts split evenly over the ranks (ffi's check)."""
  return ffi.dispatch.check_topk(topk_idx, num_experts, num_ranks)


def check_x(x, num_tokens: int):
  """bf16/f32/f16 `[T, H]`, or the FP8 pair `(x_fp8 [T, H], scales [T, ceil(H / 128)] float32)`."""
  if isinstance(x, (tuple, list)):
    if len(x) != 2:
      raise ValueError(f"an FP8 x is a pair (x_fp8, scales), got {len(x)} items")
    data, scales = array("x", x[0]), array("x scales", x[1])
    if data.dtype != jnp.float8_e4m3fn or data.ndim != 2:
      raise ValueError(f"x's FP8 data must be float8_e4m3fn [T, H], got {data.dtype} {data.shape}")
    want = (data.shape[0], -(-data.shape[1] // BLOCK))
    if scales.dtype != jnp.float32 or scales.shape != want:
      raise ValueError(f"x's scales must be float32 {want} (fp8.quantize_per_token), got {scales.dtype} "
                       f"{scales.shape}")
  else:
    data, scales = array("x", x), None
    if data.ndim != 2 or data.dtype not in X_DTYPES:
      raise ValueError(f"x must be bfloat16, float32 or float16 [T, H] (or an FP8 pair), got {data.dtype} "
                       f"{data.shape}")
  if data.shape[0] != num_tokens:
    raise ValueError(f"x has {data.shape[0]} tokens but topk_idx has {num_tokens}")
  return data, scales


def check_weights(topk_weights, shape) -> jax.Array:
  topk_weights = array("topk_weights", topk_weights)
  if topk_weights.shape != tuple(shape) or not jnp.issubdtype(topk_weights.dtype, jnp.floating):
    raise ValueError(f"topk_weights must be floating {tuple(shape)} like topk_idx, got {topk_weights.dtype} "
                     f"{topk_weights.shape}")
  return topk_weights


def axis_size(axis_name) -> int:
  """The `ep` axis size; a clear error outside `shard_map`."""
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as err:
    raise ValueError(f"axis_name={axis_name!r} is not a mesh axis here: call this inside jax.shard_map over it") \
        from err
