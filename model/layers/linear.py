"""The projections of a DeepSeek-V3 layer: a float `nnx.Linear`, or `FP8Linear` holding an FP8 checkpoint's weight as stored.

`projection(...)` builds either; `kernel(layer, dtype)` gives either as a float `[in, out]`
matrix, for the places that use the weight itself rather than the layer (MLA's absorbed
decode folds `kv_b_proj` into the queries and the output, so it dequantizes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import fp8


class FP8Linear(nnx.Module):
  """`y = x @ dequantize(weight, weight_scale_inv).T`, run as an FP8 GEMM on the stored weight (inference only).

  Params, named and laid out as in DeepSeek-V3's FP8 checkpoint:
    weight: `[out, in]` float8_e4m3fn;
    weight_scale_inv: `[ceil(out / 128), ceil(in / 128)]` float32, one scale per 128x128 block.
  Shapes the FP8 GEMM cannot take (in % 128 or out % 64) run in x's dtype on the dequantized
  weight (`fp8.matmul_quantized`).
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal(in_axis=1, out_axis=0)
    data, scale = fp8.quantize_per_block(init(rngs.params(), (out_features, in_features), jnp.float32))
    self.weight = nnx.Param(data)
    self.weight_scale_inv = nnx.Param(scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., in]` -> `[..., out]` in x's dtype."""
    return fp8.matmul_quantized(x, (self.weight[...], self.weight_scale_inv[...]))


def projection(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               fp8_weights: bool = False) -> nnx.Module:
  """A bias-free projection: `FP8Linear` with fp8_weights, else `nnx.Linear` (kernel `[in, out]`)."""
  if fp8_weights:
    return FP8Linear(in_features, out_features, rngs=rngs)
  return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def kernel(layer: nnx.Module, dtype=jnp.float32) -> jax.Array:
  """The projection's weight as a float `[in, out]` matrix of `dtype` (FP8 weights dequantized)."""
  if isinstance(layer, FP8Linear):
    return fp8.dequantize(layer.weight[...], layer.weight_scale_inv[...], out_dtype=dtype).T
  return layer.kernel[...].astype(dtype)
