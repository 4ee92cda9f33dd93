"""The test environment itself: the fake devices every distributed test relies on."""

import jax


def test_eight_devices_on_cpu():
  if jax.default_backend() == "cpu":
    assert jax.device_count() == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
  assert len(jax.devices("cpu")) == 8
