"""Inference with weights already in FP8 (a DeepSeek-V3 FP8 checkpoint's e4m3 + 128x128 `weight_scale_inv`).

`matmul_quantized(x, w)`: `x @ dequantize(w).T` with `x` quantized per token and the weight
used as stored, through `gemm_nt`. Where the shapes do not suit the GEMM (k not a multiple of
128, n not of 64) the weight is dequantized and the product runs in x's dtype instead, so any
layer of any config works and the fast path is taken wherever DeepGEMM's would be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp8 import api
from fp8.formats import BLOCK, dequantize, quantize_per_block, quantize_per_token
from fp8.validation import N_ALIGNMENT

BlockQuantized = tuple[jax.Array, jax.Array]  # (float8_e4m3fn [..., n, k], float32 [..., ceil(n/128), ceil(k/128)])


def gemm_fits(n: int, k: int) -> bool:
  """Whether an `[n, k]` weight can go through `gemm_nt` as stored."""
  return k % BLOCK == 0 and n % N_ALIGNMENT == 0


def dense(w: BlockQuantized | jax.Array, dtype) -> jax.Array:
  """A weight as a plain array of `dtype`: block-quantized pairs are dequantized, arrays cast."""
  if isinstance(w, (tuple, list)):
    return dequantize(*w, out_dtype=dtype)
  return w.astype(dtype)


def block_quantized(w: BlockQuantized | jax.Array) -> BlockQuantized:
  """A weight as a block-quantized pair: pairs as they are, float arrays quantized per 128x128 block."""
  if isinstance(w, (tuple, list)):
    return tuple(w)
  return quantize_per_block(w)


def matmul_quantized(x: jax.Array, w: BlockQuantized, *, implementation: str | None = None) -> jax.Array:
  """`x [..., k]` @ the stored `[n, k]` FP8 weight, transposed -> `[..., n]` in x's dtype (bf16 or f32)."""
  data, scale = w
  n, k = data.shape
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
  if not gemm_fits(n, k):
    return jnp.matmul(x, dense(w, x.dtype).T)
  out_dtype = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32  # float16 goes through float32
  rows = x.reshape(-1, k)
  y = api.gemm_nt(quantize_per_token(rows), (data, scale), out_dtype=out_dtype, implementation=implementation)
  return y.reshape(*x.shape[:-1], n).astype(x.dtype)
