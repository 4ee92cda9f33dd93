"""The FP8 formats: scales, UE8M0, round trips, saturation, partial tiles, calc_diff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fp8
from tests.fp8.cases import f64, normal

QUANTIZERS = {
    "per_token": (fp8.quantize_per_token, lambda m, k: (m, -(-k // 128))),
    "per_block": (fp8.quantize_per_block, lambda m, k: (-(-m // 128), -(-k // 128))),
    "per_channel": (fp8.quantize_per_channel, lambda m, k: (-(-m // 128), k)),
}


def _tile_amax(x: np.ndarray, kind: str) -> np.ndarray:
  """Per-tile max |x| of a 2-D array, by explicit loops over tiles (the oracle)."""
  m, k = x.shape
  edge_m, edge_k = {"per_token": (1, 128), "per_block": (128, 128), "per_channel": (128, 1)}[kind]
  out = np.zeros((-(-m // edge_m), -(-k // edge_k)))
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      out[i, j] = np.abs(x[i * edge_m:(i + 1) * edge_m, j * edge_k:(j + 1) * edge_k]).max()
  return out


@pytest.mark.parametrize("kind", QUANTIZERS)
@pytest.mark.parametrize("m,k", [(1, 128), (130, 200), (256, 384), (7, 64)])
def test_scale_is_clamped_amax_over_448(kind, m, k):
  quantize, scale_shape = QUANTIZERS[kind]
  x = normal(m + k, (m, k), jnp.float32) * 3.0
  # All-zero tiles of every shape take the amax floor: row 0 (1x128), column 0 (128x1), a corner (128x128).
  x = x.at[0].set(0.0).at[:, 0].set(0.0).at[128:, 128:].set(0.0)
  x_fp8, scale = quantize(x)
  assert x_fp8.dtype == jnp.float8_e4m3fn and x_fp8.shape == (m, k)
  assert scale.dtype == jnp.float32 and scale.shape == scale_shape(m, k)
  expected = np.maximum(_tile_amax(f64(x), kind), 1e-4) / 448.0
  np.testing.assert_allclose(np.asarray(scale), expected, rtol=1e-6)


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_round_trip_within_e4m3_precision(kind):
  quantize, _ = QUANTIZERS[kind]
  x = normal(1, (192, 320), jnp.float32) * jnp.logspace(-3, 3, 320)
  x_fp8, scale = quantize(x)
  back = np.asarray(fp8.dequantize(x_fp8, scale))
  spread = np.asarray(fp8.dequantize(jnp.ones(x.shape, jnp.float8_e4m3fn), scale))
  # e4m3 keeps 3 mantissa bits: half an ulp is 2**-4 relative; subnormals step by 2**-9 * scale.
  bound = np.abs(np.asarray(x)) * 2.0**-4 + spread * 2.0**-10
  assert (np.abs(back - np.asarray(x)) <= bound * (1 + 1e-6)).all()
  assert np.isclose(np.abs(np.asarray(x_fp8, np.float32)).max(), 448.0)


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_no_nan_at_the_saturation_edge(kind):
  """x * (1/scale) can land a rounding error above 448; unclipped, e4m3fn would make it NaN."""
  quantize, _ = QUANTIZERS[kind]
  for seed in range(5):
    x = jax.random.uniform(jax.random.key(seed), (256, 512), jnp.float32, -1.0, 1.0) * 10.0 ** (seed - 2)
    x_fp8, _ = quantize(x)
    assert not np.isnan(np.asarray(x_fp8, np.float32)).any()
  huge = jnp.full((128, 128), 3.0e38, jnp.float32).at[0, 0].set(-3.3e38)
  assert not np.isnan(np.asarray(quantize(huge)[0], np.float32)).any()


def test_cast_saturates_instead_of_nan():
  """The clip before every cast: unclipped, JAX's e4m3fn cast turns 470, 1e4 and inf into NaN."""
  from fp8.formats import _cast
  values = jnp.array([470.0, -470.0, 1e4, jnp.inf, -jnp.inf, 448.00003, 0.5])
  np.testing.assert_array_equal(np.asarray(_cast(values, jnp.float32(1.0)), np.float32),
                                [448, -448, 448, 448, -448, 448, 0.5])
  assert np.isnan(np.asarray(jnp.float32(470.0).astype(jnp.float8_e4m3fn), np.float32))  # why the clip exists


@given(st.floats(min_value=1e-30, max_value=1e30, allow_subnormal=False))
def test_ceil_to_ue8m0_is_the_next_power_of_two(value):
  got = float(fp8.ceil_to_ue8m0(jnp.float32(value)))
  value32 = float(np.float32(value))
  assert got == 2.0 ** np.ceil(np.log2(value32)) or (got >= value32 and got / 2 < value32)
  assert np.log2(got) == int(np.log2(got))


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_ue8m0_scales_are_powers_of_two_at_or_above_the_plain_scale(kind):
  quantize, _ = QUANTIZERS[kind]
  x = normal(2, (256, 256), jnp.float32)
  plain = np.asarray(quantize(x)[1])
  x_fp8, pow2 = quantize(x, ue8m0=True)
  pow2 = np.asarray(pow2)
  assert (np.log2(pow2) == np.round(np.log2(pow2))).all()
  assert (pow2 >= plain).all() and (pow2 < 2 * plain).all()
  assert not np.isnan(np.asarray(x_fp8, np.float32)).any()


def test_leading_dims_and_grouped_weights():
  w = normal(3, (4, 256, 384), jnp.float32)
  w_fp8, scale = fp8.quantize_per_block(w)
  assert w_fp8.shape == (4, 256, 384) and scale.shape == (4, 2, 3)
  np.testing.assert_array_equal(np.asarray(scale[2]), np.asarray(fp8.quantize_per_block(w[2])[1]))
  x = normal(4, (2, 3, 256), jnp.bfloat16)
  x_fp8, scale = fp8.quantize_per_token(x)
  assert x_fp8.shape == (2, 3, 256) and scale.shape == (2, 3, 2)
  np.testing.assert_allclose(np.asarray(fp8.dequantize(x_fp8, scale)), np.asarray(x, np.float32), rtol=0.07)


def test_quantizers_jit_and_vmap():
  x = normal(5, (3, 64, 256), jnp.float32)
  eager = fp8.quantize_per_token(x)
  mapped = jax.jit(jax.vmap(fp8.quantize_per_token))(x)
  for got, want in zip(mapped, eager):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_custom_block():
  x = normal(6, (4, 100), jnp.float32)
  x_fp8, scale = fp8.quantize_per_token(x, block=32)
  assert scale.shape == (4, 4)
  np.testing.assert_allclose(np.asarray(fp8.dequantize(x_fp8, scale, block=32)), np.asarray(x), rtol=0.07,
                             atol=1e-6)


def test_calc_diff():
  x = np.random.default_rng(0).standard_normal((64, 64))
  assert fp8.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
  assert fp8.calc_diff(x, -x) == pytest.approx(2.0)
  assert fp8.calc_diff(np.zeros(3), np.zeros(3)) == 0.0
  y = x * 1.01
  want = ((x - y) ** 2).sum() / (x**2 + y**2).sum()
  assert fp8.calc_diff(jnp.asarray(x, jnp.float32), y) == pytest.approx(want, rel=1e-4)
  assert np.isnan(fp8.calc_diff(np.array([1.0, np.nan]), np.array([1.0, 1.0])))
  with pytest.raises(ValueError, match="same shape"):
    fp8.calc_diff(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("call,match", [
    (lambda: fp8.quantize_per_token(jnp.ones((4, 128)), block=0), "block"),
    (lambda: fp8.quantize_per_token(jnp.ones((4, 128), jnp.int32)), "x must be a floating"),
    (lambda: fp8.quantize_per_token(jnp.ones((4, 128), jnp.float8_e4m3fn)), "already fp8"),
    (lambda: fp8.quantize_per_block(jnp.ones((128,))), "w must have at least 2"),
    (lambda: fp8.quantize_per_channel(jnp.ones((128,))), "x must have at least 2"),
    (lambda: fp8.dequantize(jnp.ones((4, 256)), jnp.ones((4, 3))), "scale has 3 scales"),
    (lambda: fp8.dequantize(jnp.ones((4, 256)), jnp.ones((2, 4, 2))), "does not match"),
    (lambda: fp8.contiguous_m_indices(jnp.array([3]), 100), "m_sum"),
    (lambda: fp8.contiguous_m_indices(jnp.array([3, -1]), 128), "group_sizes must be non-negative"),
    (lambda: fp8.contiguous_m_indices([1.5], 128), "group_sizes must be non-negative integers"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
