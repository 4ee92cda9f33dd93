"""FP8 e4m3 with fine-grained scales: DeepGEMM's 1x128, 128x128 and 128x1 tiles.

Every quantizer returns `(x_fp8, scale)` with `x ~= x_fp8 * scale`, one f32 scale per tile.
A tile's scale is `max(amax, 1e-4) / 448`: 448 is e4m3fn's largest finite value and the
floor keeps all-zero tiles from dividing by zero (DeepGEMM's `clamp(1e-4)`). With
`ue8m0=True` each scale is rounded up to a power of two, as Blackwell's recipe stores them.

Tiles are counted with ceil division: a trailing partial tile gets its own scale, computed as
if the tensor were zero-padded. The GEMMs need full 128-wide k tiles; the quantizers do not.

JAX's cast to float8_e4m3fn does not saturate: a value that rounds past 448 (from about 464
up, and inf) becomes NaN instead of 448. `x * (1 / scale)` overshoots 448 by at most an ulp,
which still rounds to 448, but every cast here clips to +-448 first so that no scale choice
(UE8M0, a caller's block size, a future recipe) can produce NaN from finite input.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # DeepGEMM clamps each tile's amax from below before dividing by 448
BLOCK = 128  # DeepGEMM's tile edge


def ceil_to_ue8m0(scale: jax.Array) -> jax.Array:
  """Rounds positive f32 scales up to the next power of two (exact, by bit manipulation).

  Args:
    scale: any shape, float32, positive and finite.

  Returns:
    The same shape, float32: `2**ceil(log2(scale))`, kept within f32's normal exponents.
  """
  bits = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
  exponent = (bits >> 23) & 0xFF
  exponent = exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
  exponent = jnp.clip(exponent, 1, 254)
  return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


def _check_block(block) -> int:
  if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
    raise ValueError(f"block must be a positive integer, got {block!r}")
  return int(block)


def _check_input(name: str, x, min_ndim: int) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  if x.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    raise ValueError(f"{name} is already fp8 ({x.dtype}); quantize the high-precision tensor")
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {x.shape}")
  return x


def _pad_to(x: jax.Array, axis: int, block: int) -> jax.Array:
  size = x.shape[axis]
  padded = -(-size // block) * block
  if padded == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padded - size)
  return jnp.pad(x, widths)


def _scale_from_amax(amax: jax.Array, ue8m0: bool) -> jax.Array:
  scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
  return ceil_to_ue8m0(scale) if ue8m0 else scale


def _cast(x: jax.Array, inverse_scale: jax.Array) -> jax.Array:
  # DeepGEMM multiplies by 1/scale; clip so that nothing can round past 448 into NaN.
  return jnp.clip(x * inverse_scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def quantize_per_token(x, *, block: int = BLOCK, ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """Quantizes activations with one scale per 1 x `block` tile along the last axis.

  Args:
    x: `[..., m, k]` (any leading dims) float32 or bfloat16.
    block: tile width along k; the GEMMs need 128.
    ue8m0: round every scale up to a power of two.

  Returns:
    `(x_fp8 [..., m, k] float8_e4m3fn, scale [..., m, ceil(k / block)] float32)`.
  """
  return _quantize_per_token(_check_input("x", x, 1), _check_block(block), bool(ue8m0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_per_token(x, block, ue8m0):
  k = x.shape[-1]
  num_blocks = -(-k // block)
  tiles = _pad_to(x.astype(jnp.float32), -1, block).reshape(*x.shape[:-1], num_blocks, block)
  scale = _scale_from_amax(jnp.max(jnp.abs(tiles), axis=-1), ue8m0)
  x_fp8 = _cast(tiles, 1.0 / scale[..., None]).reshape(*x.shape[:-1], num_blocks * block)[..., :k]
  return x_fp8, scale


def quantize_per_channel(x, *, block: int = BLOCK, ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """Quantizes with one scale per `block` x 1 tile along the second-to-last axis (wgrad operands).

  Args:
    x: `[..., m, k]` float32 or bfloat16; tiles run down m, one column at a time.
    block: tile height along m.
    ue8m0: round every scale up to a power of two.

  Returns:
    `(x_fp8 [..., m, k] float8_e4m3fn, scale [..., ceil(m / block), k] float32)`.
  """
  return _quantize_per_channel(_check_input("x", x, 2), _check_block(block), bool(ue8m0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_per_channel(x, block, ue8m0):
  m, k = x.shape[-2:]
  num_blocks = -(-m // block)
  tiles = _pad_to(x.astype(jnp.float32), -2, block).reshape(*x.shape[:-2], num_blocks, block, k)
  scale = _scale_from_amax(jnp.max(jnp.abs(tiles), axis=-2), ue8m0)
  x_fp8 = _cast(tiles, 1.0 / scale[..., None, :]).reshape(*x.shape[:-2], num_blocks * block, k)[..., :m, :]
  return x_fp8, scale


def quantize_per_block(w, *, block: int = BLOCK, ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
  """Quantizes weights with one scale per `block` x `block` tile of the last two axes.

  Args:
    w: `[..., n, k]` float32 or bfloat16, e.g. `[n, k]` or grouped `[num_groups, n, k]`.
    block: tile edge.
    ue8m0: round every scale up to a power of two.

  Returns:
    `(w_fp8 [..., n, k] float8_e4m3fn, scale [..., ceil(n / block), ceil(k / block)] float32)`.
  """
  return _quantize_per_block(_check_input("w", w, 2), _check_block(block), bool(ue8m0))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_per_block(w, block, ue8m0):
  n, k = w.shape[-2:]
  num_n, num_k = -(-n // block), -(-k // block)
  padded = _pad_to(_pad_to(w.astype(jnp.float32), -2, block), -1, block)
  tiles = padded.reshape(*w.shape[:-2], num_n, block, num_k, block)
  scale = _scale_from_amax(jnp.max(jnp.abs(tiles), axis=(-3, -1)), ue8m0)
  w_fp8 = _cast(tiles, 1.0 / scale[..., :, None, :, None])
  return w_fp8.reshape(padded.shape)[..., :n, :k], scale


def _tile_edge(name: str, size: int, num_scales: int, block: int) -> int:
  """The tile edge along one axis: 1 if there is a scale per element, else `block`."""
  if num_scales == size:
    return 1
  if num_scales == -(-size // block):
    return block
  raise ValueError(f"{name} has {num_scales} scales along an axis of size {size}: expected {size} "
                   f"(one per element) or {-(-size // block)} (one per {block})")


def dequantize(x_fp8, scale, *, block: int = BLOCK, out_dtype=jnp.float32) -> jax.Array:
  """Inverts any of the three quantizers: `x_fp8 * scale`, each scale spread over its tile.

  The tile is read off the shapes: along each of the last two axes, a scale per element means
  a tile edge of 1, and `ceil(size / block)` scales mean an edge of `block`.

  Args:
    x_fp8: `[..., m, k]` float8_e4m3fn (any float dtype is accepted).
    scale: `[..., m or ceil(m / block), k or ceil(k / block)]` float32.
    block: the tile edge the quantizer used.
    out_dtype: the result's dtype.

  Returns:
    `[..., m, k]` of `out_dtype`.
  """
  block = _check_block(block)
  x_fp8, scale = jnp.asarray(x_fp8), jnp.asarray(scale)
  if x_fp8.ndim < 2:
    raise ValueError(f"x_fp8 must have at least 2 dimensions, got shape {x_fp8.shape}")
  if scale.ndim != x_fp8.ndim or scale.shape[:-2] != x_fp8.shape[:-2]:
    raise ValueError(f"scale shape {scale.shape} does not match x_fp8 shape {x_fp8.shape}: "
                     "expected the same leading dims and two tiled axes")
  m, k = x_fp8.shape[-2:]
  edge_m = _tile_edge("scale", m, scale.shape[-2], block)
  edge_k = _tile_edge("scale", k, scale.shape[-1], block)
  return _dequantize(x_fp8, scale, edge_m, edge_k, jnp.dtype(out_dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize(x_fp8, scale, edge_m, edge_k, out_dtype):
  m, k = x_fp8.shape[-2:]
  spread = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), edge_m, axis=-2), edge_k, axis=-1)
  return (x_fp8.astype(jnp.float32) * spread[..., :m, :k]).astype(out_dtype)
