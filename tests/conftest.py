"""Test-wide setup: 8 fake CPU devices, the gpu and slow markers, hypothesis profiles."""

import os

# Must happen before jax is imported anywhere, so shard_map code sees 8 devices on CPU.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI replays the same examples every run (a failure there is reproducible); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _gpu_platform() -> str | None:
  try:
    return jax.devices("gpu")[0].platform
  except RuntimeError:
    return None


def pytest_collection_modifyitems(config, items):
  del config
  if _gpu_platform() is not None:
    return
  reason = f"needs a CUDA GPU; jax sees only {sorted({d.platform for d in jax.devices()})} devices"
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _mosaic_gpu_interpreter():
  """Mosaic GPU interpret mode, with this JAX's interpreter bugs patched (see that module), and its
  global state reset after every test so one failure cannot leak into the next."""
  from tests import mosaic_gpu_interpret_patches
  mosaic_gpu_interpret_patches.apply()
  yield
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
  reset_gpu_interpret_mode_state()
