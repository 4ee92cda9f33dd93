"""Choosing among an op's implementations by name or by platform preference."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax


def select_and_run(op: str, backends: Mapping[str, Callable[..., Any]], implementation: str | None,
                   preferred: Mapping[str, Sequence[str]], *args, **kwargs):
  """Runs `backends[implementation](*args, **kwargs)`, or the first preferred backend that accepts the case.

  Args:
    op: the op's name, for error messages.
    backends: implementation name -> callable.
    implementation: a name in `backends`, or None.
    preferred: platform (`jax.default_backend()`, e.g. "cpu", "gpu") -> names in order of
      preference; a platform not listed uses `("xla",)`. Names missing from `backends` are skipped.

  Raises:
    ValueError: `implementation` is not one of `backends`.
    NotImplementedError: only if the last candidate raises it.
  """
  if implementation is not None:
    if implementation not in backends:
      raise ValueError(f"implementation={implementation!r} is not available for {op}; "
                       f"choose from {sorted(backends)} or None")
    return backends[implementation](*args, **kwargs)
  order = [name for name in preferred.get(jax.default_backend(), ("xla",)) if name in backends]
  if not order:
    raise ValueError(f"no implementation of {op} is preferred on {jax.default_backend()}; "
                     f"pass one of {sorted(backends)}")
  for name in order[:-1]:
    try:
      return backends[name](*args, **kwargs)
    except NotImplementedError:
      continue
  return backends[order[-1]](*args, **kwargs)
