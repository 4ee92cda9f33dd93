"""Argument checks shared by the balancer's public functions: every caller error is a ValueError naming the argument."""

from __future__ import annotations

import numbers

import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_positive_int(name: str, value) -> int:
  """Returns `value` as an int, or raises ValueError if it is not an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}")
  if value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value}")
  return int(value)


def as_load_matrix(weight, name: str = "weight") -> np.ndarray:
  """Converts per-layer expert loads to a float32 `[num_layers, num_experts]` numpy array.

  Args:
    weight: `[num_layers, num_experts]` loads as a numpy or jax array or nested lists, of int
      or float dtype. Loads must be finite and non-negative, and each layer's total must fit
      in float32.
    name: the argument's name, for error messages.

  Returns:
    `[num_layers, num_experts]` float32, a fresh copy.
  """
  try:
    array = np.asarray(weight)
  except (ValueError, TypeError) as err:
    raise ValueError(f"{name} must be a rectangular [num_layers, num_experts] array: {err}") from None
  if array.dtype.kind not in "iuf":
    raise ValueError(f"{name} must hold int or float loads, got dtype {array.dtype}")
  if array.ndim != 2:
    raise ValueError(f"{name} must be 2-D [num_layers, num_experts], got shape {array.shape}")
  num_layers, num_experts = array.shape
  if num_layers == 0 or num_experts == 0:
    raise ValueError(f"{name} must have at least one layer and one expert, got shape {array.shape}")
  if array.dtype.kind == "f":
    bad = ~np.isfinite(array)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite loads, the first at index {where}")
  if (array < 0).any():
    where = tuple(int(i) for i in np.argwhere(array < 0)[0])
    raise ValueError(f"{name} has {int((array < 0).sum())} negative loads, the first at index {where}")
  totals = array.astype(np.float64).sum(axis=-1)
  if totals.max() > _FLOAT32_MAX / 2:
    layer = int(np.argmax(totals))
    raise ValueError(f"{name}: layer {layer}'s total load {totals[layer]:.3g} overflows float32 accumulation")
  return array.astype(np.float32)


def check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus):
  """Validates `rebalance_experts` arguments once, before any work.

  Returns:
    `(weight [L, E] float32, num_replicas, num_groups, num_nodes, num_gpus)` as plain ints.
  """
  weight = as_load_matrix(weight)
  num_replicas = check_positive_int("num_replicas", num_replicas)
  num_groups = check_positive_int("num_groups", num_groups)
  num_nodes = check_positive_int("num_nodes", num_nodes)
  num_gpus = check_positive_int("num_gpus", num_gpus)
  num_experts = weight.shape[1]
  if num_replicas > _INT32_MAX:
    raise ValueError(f"{num_replicas=} exceeds the int32 slot ids that routing uses")
  if num_replicas % num_gpus:
    raise ValueError(f"{num_replicas=} must be a multiple of {num_gpus=}")
  if num_replicas < num_experts:
    raise ValueError(f"{num_replicas=} must be at least the number of logical experts, {num_experts}")
  if num_experts % num_groups:
    raise ValueError(f"{num_groups=} must divide the number of logical experts, {num_experts}")
  if num_gpus % num_nodes:
    raise ValueError(f"{num_nodes=} must divide {num_gpus=}")
  return weight, num_replicas, num_groups, num_nodes, num_gpus


def concrete_or_none(x) -> np.ndarray | None:
  """`x` as numpy when its value is known, None while jax is tracing it (values cannot be checked then)."""
  import jax  # Deferred: the numpy-only rebalance path should not pay for importing jax.

  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


_INT32_MAX = int(np.iinfo(np.int32).max)


def checked_int_array(name: str, x, *, min_value: int | None = None, max_value: int = _INT32_MAX):
  """Checks an int array argument of a jittable function, then hands it to jax.

  The dtype is always checked; the range only when the value is concrete (not while traced).
  The range is checked on the caller's values before any int32 conversion, so an int64 id
  past int32 cannot wrap into a valid-looking one.

  Returns:
    `(array, values)`: `x` as a jax array, and its numpy values (None while traced).
  """
  import jax.numpy as jnp

  try:
    values = concrete_or_none(x)
  except ValueError as err:  # ragged nested lists
    raise ValueError(f"{name} must be a rectangular int array: {err}") from None
  if values is None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an int array, got dtype {x.dtype}")
    return x, None
  if values.dtype.kind not in "iu":
    raise ValueError(f"{name} must be an int array, got dtype {values.dtype}")
  if values.size and min_value is not None and values.min() < min_value:
    count = int((values < min_value).sum())
    raise ValueError(f"{name} holds {count} values below {min_value}, e.g. {int(values.min())}")
  if values.size and values.max() > max_value:
    count = int((values > max_value).sum())
    raise ValueError(f"{name} holds {count} values above {max_value}, e.g. {int(values.max())}")
  return jnp.asarray(values), values
