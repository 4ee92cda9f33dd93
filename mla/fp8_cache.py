"""A dense FP8 MLA KV cache in FlashMLA's 656-byte-per-token format.

FlashMLA reads this format only in sparse decode; its users ask for it in dense decode too
(FlashMLA issues #44 and #204), which `flash_mla_with_kvcache(..., is_fp8_kvcache=True)` does.

Per token and KV head, 656 bytes:
  bytes   0..511  the 512 NoPE (latent) values as float8_e4m3fn, in 4 tiles of 128
  bytes 512..527  4 float32 scales, one per tile: 2**ceil(log2(max(amax / 448, 1e-4)))
  bytes 528..655  the 64 RoPE values, unquantized bfloat16
Scales are powers of two, so `value / scale` never exceeds 448 and dequantization is exact
multiplication. Byte order is the host's (little-endian), as FlashMLA's tensor views are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fp8 import ceil_to_ue8m0

D_NOPE, D_ROPE, TILE = 512, 64, 128
NUM_TILES = D_NOPE // TILE
BYTES_PER_TOKEN = D_NOPE + 4 * NUM_TILES + 2 * D_ROPE  # 656
_SCALE_FLOOR = 1e-4
_FP8_MAX = 448.0


def quantize_kv_cache(k_cache) -> jax.Array:
  """bf16 latent cache -> the 656-byte FP8 format.

  Args:
    k_cache: `[num_blocks, page_size, h_kv, 576]` bfloat16 (or float16/float32): 512 NoPE
      values then 64 RoPE values per token.

  Returns:
    `[num_blocks, page_size, h_kv, 656]` uint8.
  """
  k_cache = jnp.asarray(k_cache)
  if k_cache.ndim != 4 or k_cache.shape[-1] != D_NOPE + D_ROPE:
    raise ValueError(f"k_cache must be [num_blocks, page_size, h_kv, {D_NOPE + D_ROPE}], got {k_cache.shape}")
  if not jnp.issubdtype(k_cache.dtype, jnp.floating) or k_cache.dtype.itemsize < 2:
    raise ValueError(f"k_cache must be bfloat16, float16 or float32, got {k_cache.dtype}")
  return _quantize(k_cache)


@jax.jit
def _quantize(k_cache):
  lead = k_cache.shape[:-1]
  nope = k_cache[..., :D_NOPE].astype(jnp.float32).reshape(*lead, NUM_TILES, TILE)
  scale = ceil_to_ue8m0(jnp.maximum(jnp.max(jnp.abs(nope), axis=-1) / _FP8_MAX, _SCALE_FLOOR))
  values = jnp.clip(nope / scale[..., None], -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
  rope = k_cache[..., D_NOPE:].astype(jnp.bfloat16)
  parts = [jax.lax.bitcast_convert_type(values.reshape(*lead, D_NOPE), jnp.uint8),
           jax.lax.bitcast_convert_type(scale, jnp.uint8).reshape(*lead, 4 * NUM_TILES),
           jax.lax.bitcast_convert_type(rope, jnp.uint8).reshape(*lead, 2 * D_ROPE)]
  return jnp.concatenate(parts, axis=-1)


def dequantize_kv_cache(packed, dtype=jnp.bfloat16) -> jax.Array:
  """The 656-byte FP8 format -> a `[..., 576]` latent cache.

  Args:
    packed: `[..., 656]` uint8 (or float8_e4m3fn, as FlashMLA views it), e.g.
      `[num_blocks, page_size, h_kv, 656]` or gathered pages.
    dtype: the result's dtype.

  Returns:
    `[..., 576]` of `dtype`: NoPE values times their tile's scale, then the RoPE values.
  """
  packed = jnp.asarray(packed)
  if packed.shape[-1:] != (BYTES_PER_TOKEN,):
    raise ValueError(f"packed must end in {BYTES_PER_TOKEN} bytes per token, got shape {packed.shape}")
  if packed.dtype == jnp.float8_e4m3fn:
    packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"packed must be uint8 or float8_e4m3fn, got {packed.dtype}")
  return _dequantize(packed, jnp.dtype(dtype))


def unpack(packed: jax.Array, dtype) -> jax.Array:
  """`[..., 656]` uint8 -> `[..., 576]` of `dtype`; traceable, for use inside decode kernels' jnp paths."""
  lead = packed.shape[:-1]
  values = jax.lax.bitcast_convert_type(packed[..., :D_NOPE], jnp.float8_e4m3fn)
  scale_bytes = packed[..., D_NOPE:D_NOPE + 4 * NUM_TILES].reshape(*lead, NUM_TILES, 4)
  scale = jax.lax.bitcast_convert_type(scale_bytes, jnp.float32)
  rope_bytes = packed[..., D_NOPE + 4 * NUM_TILES:].reshape(*lead, D_ROPE, 2)
  rope = jax.lax.bitcast_convert_type(rope_bytes, jnp.bfloat16)
  nope = values.astype(jnp.float32).reshape(*lead, NUM_TILES, TILE) * scale[..., None]
  return jnp.concatenate([nope.reshape(*lead, D_NOPE).astype(dtype), rope.astype(dtype)], axis=-1)


_dequantize = jax.jit(unpack, static_argnums=1)
