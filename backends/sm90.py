"""The device check every Hopper kernel makes before compiling: sm90, or step aside for another backend."""

from __future__ import annotations

import jax

SM90 = "9.0"


def require_sm90(what: str) -> jax.Device:
  """The local sm90 GPU, or NotImplementedError (so `implementation=None` falls through to xla)
  naming `what` and how to run it elsewhere (interpret mode)."""
  device = jax.devices()[0]
  if device.platform != "gpu" or getattr(device, "compute_capability", None) != SM90:
    raise NotImplementedError(f"{what} needs an sm90 (Hopper) GPU, not {device.device_kind}; "
                              "pass interpret=True to run its code in Mosaic GPU interpret mode")
  return device
