"""An FP8 linear layer with DeepSeek-V3's training recipe: FP8 fprop, dgrad and wgrad.

  forward  y  = x @ w.T     x per token (1x128), w per block (128x128)          gemm_nt
  dgrad    dx = dy @ w      dy per token, w's 128x128 blocks transposed         gemm_nt
  wgrad    dw = dy.T @ x    dy and x per channel (128x1 down the tokens)        k_grouped_gemm_tn

All three accumulate in f32 with per-128 promotion. The forward keeps only FP8 copies for the
backward: w quantized per block (transposed for dgrad, which is exact) and x quantized per
channel, as V3 caches its activations in FP8. Feature sizes that are not multiples of 128,
and token counts that are not, are zero-padded inside; zeros add nothing to any product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fp8 import api
from fp8.formats import BLOCK, quantize_per_block, quantize_per_channel, quantize_per_token


def _pad(x: jax.Array, rows: int, cols: int) -> jax.Array:
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _round_up(size: int) -> int:
  return -(-size // BLOCK) * BLOCK


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear_2d(x, w, ue8m0, implementation, interpret):
  y, _ = _linear_fwd(x, w, ue8m0, implementation, interpret)
  return y


def _linear_fwd(x, w, ue8m0, implementation, interpret):
  (m, k_in), n_out = x.shape, w.shape[0]
  k_pad, n_pad, m_pad = _round_up(k_in), _round_up(n_out), _round_up(m)
  x_pad = _pad(x, m, k_pad)
  w_q = quantize_per_block(_pad(w, n_pad, k_pad), ue8m0=ue8m0)
  y = api.gemm_nt(quantize_per_token(x_pad, ue8m0=ue8m0), w_q, out_dtype=jnp.float32,
                  implementation=implementation, interpret=interpret)
  x_channel = quantize_per_channel(_pad(x_pad, m_pad, k_pad), ue8m0=ue8m0)
  # Empty slices carry x's and w's dtypes (and, under shard_map, the mesh axes each varies
  # over) and k_in to the backward; dy brings m and n_out.
  residuals = (w_q, x_channel, x[:0], w[:0, :0])
  return y[:, :n_out].astype(x.dtype), residuals


def _linear_bwd(ue8m0, implementation, interpret, residuals, dy):
  (w_fp8, w_scale), x_channel, x_like, w_like = residuals
  (m, n_out), k_in = dy.shape, x_like.shape[1]
  k_pad, n_pad, m_pad = w_fp8.shape[1], w_fp8.shape[0], x_channel[0].shape[0]
  dy_pad = _pad(dy.astype(jnp.float32), m, n_pad)
  w_t = (w_fp8.T, w_scale.T)  # [k_pad, n_pad] with [k_pad/128, n_pad/128] scales: same quantization
  dx = api.gemm_nt(quantize_per_token(dy_pad, ue8m0=ue8m0), w_t, out_dtype=jnp.float32,
                   implementation=implementation, interpret=interpret)
  dy_channel = quantize_per_channel(_pad(dy_pad, m_pad, n_pad), ue8m0=ue8m0)
  dw = api.k_grouped_gemm_tn_contiguous(dy_channel, x_channel, [m_pad], implementation=implementation,
                                        interpret=interpret)[0]
  return _like(dx[:, :k_in], x_like), _like(dw[:n_out, :k_in], w_like)


def _like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """The cotangent in the primal's dtype and mesh-axis type: summed over the axes only it varies over.

  Under shard_map a weight replicated over an axis (say `ep`) gets a gradient from every rank's
  tokens; the sum over that axis is its gradient, as JAX's own transpose of the implicit
  broadcast would give.
  """
  extra = tuple(jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying)
  if extra:
    cotangent = jax.lax.psum(cotangent, extra)
  missing = tuple(jax.typeof(primal).manual_axis_type.varying - jax.typeof(cotangent).manual_axis_type.varying)
  if missing:
    cotangent = jax.lax.pcast(cotangent, missing, to="varying")
  return cotangent.astype(primal.dtype)


_linear_2d.defvjp(_linear_fwd, _linear_bwd)


def linear(x, w, *, ue8m0: bool = False, implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """`y = x @ w.T` in FP8, forward and backward (DeepSeek-V3's recipe); differentiable.

  Args:
    x: `[..., in_features]` bfloat16 or float32 activations.
    w: `[out_features, in_features]` bfloat16 or float32 weights (PyTorch/HF layout).
    ue8m0: round every scale up to a power of two.
    implementation: the GEMM backend, or None for the platform's best (the Hopper kernels on
      sm90, else XLA).
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `y [..., out_features]` in x's dtype. Gradients come back in x's and w's dtypes.
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  for name, array in (("x", x), ("w", w)):
    if not jnp.issubdtype(array.dtype, jnp.floating) or array.dtype.itemsize < 2:
      raise ValueError(f"{name} must be bfloat16 or float32 (or float16/float64), got {array.dtype}")
  if w.ndim != 2:
    raise ValueError(f"w must be 2-D [out_features, in_features], got shape {w.shape}")
  if x.ndim < 1 or x.shape[-1] != w.shape[1]:
    raise ValueError(f"x's last dim must equal w's in_features {w.shape[1]}, got x shape {x.shape}")
  missing = [op for op in ("gemm_nt", "k_grouped_gemm_tn_contiguous")
             if implementation is not None and implementation not in api.IMPLEMENTATIONS[op]]
  if missing:
    raise ValueError(f"implementation={implementation!r} is not available for {missing[0]}, which the "
                     "linear layer's backward needs; choose one both GEMMs have, or None")
  lead = x.shape[:-1]
  y = _linear_2d(x.reshape(-1, x.shape[-1]), w, bool(ue8m0), implementation, bool(interpret))
  return y.reshape(*lead, w.shape[0])


class Linear(nnx.Module):
  """A Flax NNX dense layer computed by `fp8.linear`; the weight is `[out_features, in_features]`.

  Parameters stay in `param_dtype` (the optimizer's master copy); only the GEMMs run in FP8.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = False,
               param_dtype=jnp.float32, ue8m0: bool = False, implementation: str | None = None,
               interpret: bool = False):
    for name, value in (("in_features", in_features), ("out_features", out_features)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    init = nnx.initializers.lecun_normal(in_axis=1, out_axis=0)
    self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.ue8m0 = ue8m0
    self.implementation = implementation
    self.interpret = interpret

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., in_features]` -> `[..., out_features]` in x's dtype."""
    y = linear(x, self.weight[...], ue8m0=self.ue8m0, implementation=self.implementation, interpret=self.interpret)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y
