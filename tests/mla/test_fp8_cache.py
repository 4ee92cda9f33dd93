"""The 656-byte FP8 KV cache: byte layout, scales, round trip, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla


def _cache(seed=0, shape=(2, 64, 1, 576)):
  return jnp.clip(jax.random.normal(jax.random.key(seed), shape) / 10, -1, 1).astype(jnp.bfloat16)


def test_byte_layout_scales_and_rope():
  k = _cache()
  packed = np.asarray(mla.quantize_kv_cache(k))
  assert packed.shape == (2, 64, 1, 656) and packed.dtype == np.uint8
  nope = np.asarray(k[..., :512], np.float32).reshape(2, 64, 1, 4, 128)
  scales = packed[..., 512:528].copy().view(np.float32)  # little-endian f32, one per 128 values
  want = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(nope).max(-1) / 448, 1e-4)))
  np.testing.assert_array_equal(scales, want)
  rope = packed[..., 528:].copy().view(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(rope, np.float32), np.asarray(k[..., 512:], np.float32))
  values = packed[..., :512].copy().view(jnp.float8_e4m3fn).astype(np.float32).reshape(2, 64, 1, 4, 128)
  assert np.abs(values).max() <= 448 and not np.isnan(values).any()


def test_round_trip_within_e4m3_precision():
  k = _cache(1, (3, 64, 2, 576))
  back = np.asarray(mla.dequantize_kv_cache(mla.quantize_kv_cache(k)), np.float32)
  k32 = np.asarray(k, np.float32)
  np.testing.assert_array_equal(back[..., 512:], k32[..., 512:])
  scale = np.repeat(np.asarray(mla.quantize_kv_cache(k))[..., 512:528].copy().view(np.float32), 128, -1)
  # half an e4m3 ulp (2**-4 relative), or half the subnormal step (2**-10 of the scale), plus bf16 rounding
  bound = (np.abs(k32[..., :512]) * 2.0**-4 + scale * 2.0**-10) * (1 + 2.0**-7)
  assert (np.abs(back[..., :512] - k32[..., :512]) <= bound).all()
  fp8_view = jax.lax.bitcast_convert_type(mla.quantize_kv_cache(k), jnp.float8_e4m3fn)  # FlashMLA's view
  np.testing.assert_array_equal(np.asarray(mla.dequantize_kv_cache(fp8_view), np.float32), back)


def test_all_zero_tokens_use_the_scale_floor():
  packed = np.asarray(mla.quantize_kv_cache(jnp.zeros((1, 64, 1, 576), jnp.bfloat16)))
  np.testing.assert_array_equal(packed[..., 512:528].copy().view(np.float32), 2.0 ** np.ceil(np.log2(1e-4)))
  assert not np.asarray(mla.dequantize_kv_cache(packed), np.float32).any()


@pytest.mark.parametrize("call,match", [
    (lambda: mla.quantize_kv_cache(jnp.zeros((1, 64, 1, 512))), "k_cache must be"),
    (lambda: mla.quantize_kv_cache(jnp.zeros((1, 64, 1, 576), jnp.int8)), "bfloat16, float16 or float32"),
    (lambda: mla.dequantize_kv_cache(jnp.zeros((1, 64, 1, 576), jnp.uint8)), "656 bytes"),
    (lambda: mla.dequantize_kv_cache(jnp.zeros((1, 64, 1, 656), jnp.int32)), "uint8 or float8_e4m3fn"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
