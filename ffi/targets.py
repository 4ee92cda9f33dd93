"""Lazy, idempotent registration of the FFI targets: nothing compiles until the first call needs it.

The same target names are registered for `platform="cpu"` (handlers `<Name>Cpu`) and
`platform="CUDA"` (handlers `<Name>Cuda`); the contract is `ffi/csrc/INTERFACE.md`.
"""

from __future__ import annotations

import ctypes
import threading

import jax

from ffi import build

# target name -> handler symbol stem
TARGETS = {
    "fireflyer_dispatch_layout": "DispatchLayout",
    "fireflyer_dispatch_pack": "DispatchPack",
    "fireflyer_combine_unpack": "CombineUnpack",
}
_PLATFORMS = {"cpu": ("cpu", "Cpu"), "cuda": ("CUDA", "Cuda")}
_registered: set[str] = set()
_libraries: list[ctypes.CDLL] = []  # kept alive: XLA holds raw pointers into them
_lock = threading.Lock()


def ensure_registered(kind: str) -> None:
  """Builds (or loads from the cache) and registers the `kind` library ("cpu" or "cuda") once per process.

  Raises:
    build.CompilerNotFoundError, build.BuildError: as `ffi.build.build`.
  """
  if kind not in _PLATFORMS:
    raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
  with _lock:
    if kind in _registered:
      return
    library = ctypes.cdll.LoadLibrary(str(build.build(kind)))
    platform, suffix = _PLATFORMS[kind]
    for target, stem in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, stem + suffix)), platform=platform)
    _libraries.append(library)
    _registered.add(kind)


def ensure_registered_for_backend() -> None:
  """Registers the CPU library, and the CUDA one when JAX sees a GPU."""
  ensure_registered("cpu")
  try:
    has_gpu = bool(jax.devices("gpu"))
  except RuntimeError:
    has_gpu = False
  if has_gpu:  # GPU arrays may be used even when the default backend is the CPU
    ensure_registered("cuda")
