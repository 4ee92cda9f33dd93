"""RMSNorm as DeepSeek's (and Hugging Face's) DeepseekV3RMSNorm computes it: in float32, weight applied after the cast back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """`y = weight * (x / sqrt(mean(x^2) + eps))`, the normalization in float32.

  Args:
    dim: the normalized (last) axis size.
    eps: added to the mean square.
    param_dtype: the weight's dtype (ones at init).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = float(eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., dim]` -> same shape and dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
