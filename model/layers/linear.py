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


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """A `dot_general` for `nnx.Linear` that runs `fp8.linear` (FP8 forward, dgrad and wgrad; DeepSeek-V3's recipe).

  `lhs [..., in]` contracted with `rhs [in, out]` on their last and first axes, which is the
  only contraction `nnx.Linear` makes; the result comes back in lhs's dtype.
  """
  del precision, preferred_element_type
  if out_sharding is not None:
    raise ValueError("fp8_dot_general does not take out_sharding")
  if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(dimension_numbers[1]) or rhs.ndim != 2:
    raise ValueError(f"fp8_dot_general contracts [..., in] with [in, out] only, got dimension_numbers "
                     f"{dimension_numbers} for shapes {lhs.shape} and {rhs.shape}")
  return fp8.linear(lhs, rhs.T)


def use_fp8_training(model: nnx.Module) -> int:
  """Makes the attention and MLP projections of `model` compute through `fp8.linear`; returns how many.

  The weights stay as they are (the optimizer's master copy); only the GEMMs run in FP8. The
  projections are those DeepSeek's FP8 checkpoints quantize (`*_proj` inside `self_attn` or a
  dense `mlp`); embeddings, norms, the router, the output head, MTP's `eh_proj`, and the MoE
  layer's routed and shared experts (grouped GEMMs in `expert_parallel`) are left in their dtype.
  """
  count = 0
  for path, node in nnx.iter_graph(model):
    names = [str(p) for p in path]
    if isinstance(node, nnx.Linear) and names and names[-1].endswith(("_proj", "_proj_with_mqa")) \
        and ("self_attn" in names or "mlp" in names):
      node.dot_general = fp8_dot_general
      count += 1
  return count


def kernel(layer: nnx.Module, dtype=jnp.float32) -> jax.Array:
  """The projection's weight as a float `[in, out]` matrix of `dtype` (FP8 weights dequantized)."""
  if isinstance(layer, FP8Linear):
    return fp8.dequantize(layer.weight[...], layer.weight_scale_inv[...], out_dtype=dtype).T
  return layer.kernel[...].astype(dtype)
