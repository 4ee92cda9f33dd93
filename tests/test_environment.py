"""The test environment itself: the 8 fake CPU devices every distributed test relies on, and the GPU
where there is one."""

import jax
import numpy as np
import pytest


def test_eight_devices_on_cpu():
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
  assert len(jax.devices("cpu")) == 8


@pytest.mark.gpu
def test_gpu_is_visible_and_computes_like_the_cpu():
  gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
  x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
  gram = jax.jit(lambda a: jax.numpy.matmul(a, a.T, precision="highest"))  # no TF32 on the GPU
  on_gpu, on_cpu = gram(jax.device_put(x, gpu)), gram(jax.device_put(x, cpu))
  assert on_gpu.devices() == {gpu}
  np.testing.assert_allclose(np.asarray(on_gpu), np.asarray(on_cpu), rtol=1e-4, atol=1e-3)
