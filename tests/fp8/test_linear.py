"""The FP8 linear layer: forward and VJP against `jax.vjp` of the unquantized product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fp8
from tests.fp8.cases import backend, implementations, interpreted, normal

IMPLS = implementations("gemm_nt", "k_grouped_gemm_tn_contiguous")


def _vjps(x, w, dy, **kwargs):
  y, back = jax.vjp(lambda x, w: fp8.linear(x, w, **kwargs), x, w)
  y_ref, back_ref = jax.vjp(lambda x, w: jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32).T), x, w)
  return (y, *back(dy)), (y_ref, *back_ref(dy.astype(jnp.float32)))


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("lead,k_in,n_out,dtype", [
    ((256,), 512, 384, jnp.bfloat16),
    ((2, 3), 200, 72, jnp.float32),  # nothing a multiple of 128: padded inside
    ((130,), 128, 256, jnp.float32),
])
def test_forward_and_gradients_match_the_unquantized_product(implementation, lead, k_in, n_out, dtype):
  if interpreted(implementation) and k_in * n_out > 128 * 256:
    pytest.skip("too large for interpret mode; runs natively on a GPU")
  x = normal(1, (*lead, k_in), dtype)
  w = normal(2, (n_out, k_in), dtype) * 0.05
  dy = normal(3, (*lead, n_out), dtype)
  got, want = _vjps(x, w, dy, **backend(implementation))
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.dtype == dtype and g.shape == r.shape, name
    assert fp8.calc_diff(g, r) < 1e-3, name


def test_ue8m0_and_jit():
  x, w, dy = normal(4, (128, 256)), normal(5, (128, 256)), normal(6, (128, 128))
  got, want = jax.jit(lambda x, w, dy: _vjps(x, w, dy, ue8m0=True))(x, w, dy)
  for g, r in zip(got, want):
    assert fp8.calc_diff(g, r) < 2e-3  # power-of-two scales waste up to one bit of range


def test_wgrad_sees_fp8_not_the_original_activations():
  """The backward uses the FP8 copy cached in the forward: its dw is exactly the dequantized product."""
  x, w, dy = normal(7, (128, 128), jnp.float32), normal(8, (128, 128), jnp.float32), normal(9, (128, 128))
  _, back = jax.vjp(fp8.linear, x, w)
  _, dw = back(dy.astype(jnp.float32))
  dy_q = fp8.dequantize(*fp8.quantize_per_channel(dy.astype(jnp.float32)))
  x_q = fp8.dequantize(*fp8.quantize_per_channel(x))
  exact = np.asarray(dy_q, np.float64).T @ np.asarray(x_q, np.float64)
  assert fp8.calc_diff(dw, exact) < 1e-7


def test_nnx_module_trains():
  model = fp8.Linear(256, 128, use_bias=True, rngs=nnx.Rngs(0))
  assert model.weight.shape == (128, 256) and model.bias.shape == (128,)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  teacher = normal(10, (128, 256), jnp.float32) * 0.1
  x = normal(11, (512, 256), jnp.float32)
  target = x @ teacher.T + 0.5

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.1 * losses[0]


def test_vmap_over_a_stack_of_layers_and_empty_batches():
  xs, ws, dys = normal(12, (3, 64, 256)), normal(13, (3, 128, 256)), normal(14, (3, 64, 128))
  grads = jax.vmap(lambda x, w, dy: jax.vjp(fp8.linear, x, w)[1](dy))(xs, ws, dys)
  for i in range(3):
    want = jax.vjp(fp8.linear, xs[i], ws[i])[1](dys[i])
    for g, r in zip(grads, want):
      np.testing.assert_allclose(np.asarray(g[i], np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-2)
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8.linear(x, w)), argnums=(0, 1))(jnp.zeros((0, 256)), ws[0])
  assert dx.shape == (0, 256) and not np.asarray(dw).any()


@pytest.mark.parametrize("call,match", [
    (lambda: fp8.linear(jnp.ones((4, 64)), jnp.ones((32, 128))), "in_features 128"),
    (lambda: fp8.linear(jnp.ones((4, 64)), jnp.ones((32, 64, 1))), "w must be 2-D"),
    (lambda: fp8.linear(jnp.ones((4, 64), jnp.int32), jnp.ones((32, 64))), "x must be bfloat16 or float32"),
    (lambda: fp8.linear(jnp.ones((4, 64)), jnp.ones((32, 64), jnp.float8_e4m3fn)), "w must be"),
    (lambda: fp8.linear(jnp.ones(()), jnp.ones((32, 64))), "x's last dim"),
    (lambda: fp8.Linear(0, 8, rngs=nnx.Rngs(0)), "in_features must be a positive int"),
    (lambda: fp8.linear(jnp.ones((4, 64)), jnp.ones((32, 64)), implementation="cutlass"), "not available"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
