"""Rotary position embedding with YaRN context extension, as DeepSeek-V3 computes it.

Frequencies: `inv_freq[i] = theta ** (-2i / d)`. With YaRN (`rope_scaling`), dimensions that
rotate fast (more than `beta_fast` turns over the original context) keep their frequency,
slow ones (fewer than `beta_slow` turns) are divided by `factor`, with a linear ramp between,
and cos/sin are scaled by `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` where
`mscale(s, m) = 0.1 * m * ln(s) + 1` (1 for s <= 1). The attention's softmax scale takes
`mscale(factor, mscale_all_dim) ** 2` (`softmax_scale`).

Pairs are interleaved: `(x[2i], x[2i+1])` rotates by `position * inv_freq[i]` (DeepSeek's
complex-number form). Hugging Face's DeepseekV3 returns the same values de-interleaved (evens,
then odds); attention scores are the same either way. With `rope_interleave=False` the pairs
are `(x[i], x[i + d/2])`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, YarnScaling


def _mscale(scale: float, mscale: float) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
  """The dimension index whose frequency makes `num_rotations` turns over `max_positions`."""
  return dim * math.log(max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, theta: float, scaling: YarnScaling | None) -> tuple[np.ndarray, float]:
  """`(inv_freq [dim / 2] float32, cos/sin multiplier)` for RoPE over `dim` dimensions."""
  exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
  extrapolated = (1.0 / theta ** exponents).astype(np.float32)
  if scaling is None:
    return extrapolated, 1.0
  interpolated = (1.0 / (scaling.factor * theta ** exponents)).astype(np.float32)
  low = max(math.floor(_correction_dim(scaling.beta_fast, dim, theta, scaling.original_max_position_embeddings)), 0)
  high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, theta, scaling.original_max_position_embeddings)),
             dim - 1)
  if low == high:
    high += 0.001  # a ramp of zero width
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp  # 1: extrapolate (fast dimensions), 0: interpolate
  inv_freq = (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)
  return inv_freq, _mscale(scaling.factor, scaling.mscale) / _mscale(scaling.factor, scaling.mscale_all_dim)


def softmax_scale(config: ModelConfig) -> float:
  """MLA's softmax scale: `qk_head_dim ** -0.5`, times `mscale(factor, mscale_all_dim) ** 2` under YaRN."""
  scale = config.qk_head_dim ** -0.5
  scaling = config.rope_scaling
  if scaling is not None and scaling.mscale_all_dim:
    scale *= _mscale(scaling.factor, scaling.mscale_all_dim) ** 2
  return scale


class RotaryEmbedding:
  """cos/sin tables for positions `[0, max_position_embeddings)`; not a module (no parameters)."""

  def __init__(self, config: ModelConfig):
    inv_freq, multiplier = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
    angles = np.outer(np.arange(config.max_position_embeddings, dtype=np.float32), inv_freq)
    self.interleaved = config.rope_interleave
    self.cos = jnp.asarray(np.cos(angles) * multiplier, jnp.float32)  # [max_positions, d / 2]
    self.sin = jnp.asarray(np.sin(angles) * multiplier, jnp.float32)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """`x [..., seq, heads, d]` rotated at `positions [..., seq]` (int); dtype kept."""
    return apply_rotary(x, self.cos[positions], self.sin[positions], interleaved=self.interleaved)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool = True) -> jax.Array:
  """Rotates pairs: `x [..., seq, heads, d]`, `cos`/`sin [..., seq, d / 2]` -> x's shape and dtype.

  Pair i is `(x[2i], x[2i+1])` when interleaved (DeepSeek's weights), else `(x[i], x[i + d/2])`
  (`rope_interleave=False` in a Hugging Face config).
  """
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  if interleaved:
    pairs = x32.reshape(*x.shape[:-1], half, 2)
    first, second = pairs[..., 0], pairs[..., 1]
  else:
    first, second = x32[..., :half], x32[..., half:]
  cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
  rotated = (first * cos - second * sin, first * sin + second * cos)
  if interleaved:
    return jnp.stack(rotated, axis=-1).reshape(x.shape).astype(x.dtype)
  return jnp.concatenate(rotated, axis=-1).astype(x.dtype)
