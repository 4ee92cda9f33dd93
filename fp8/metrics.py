"""DeepGEMM's accuracy metric for FP8 GEMMs."""

from __future__ import annotations

import numpy as np


def calc_diff(x, y) -> float:
  """`1 - 2 * sum(x * y) / sum(x**2 + y**2)` in float64: 0 when equal, ~1e-3 at FP8 accuracy.

  DeepGEMM judges FP8 GEMMs by this rather than elementwise tolerances: it is the relative
  squared error `sum((x - y)**2) / sum(x**2 + y**2)`, so it scales with the data.

  Args:
    x: any shape, any real dtype (jax or numpy); converted to float64 on the host.
    y: the same shape as x.

  Returns:
    A Python float; 0.0 when both are all zero, NaN when either holds NaN.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  denominator = float((x * x + y * y).sum())
  if denominator == 0.0:
    return 0.0
  return float(1.0 - 2.0 * (x * y).sum() / denominator)
