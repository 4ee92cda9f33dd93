"""Synthetic expert loads for the demo, the benchmark and the tests (token counts, int64)."""

from __future__ import annotations

import numbers

import numpy as np

from balancer.validation import check_positive_int


def _check_common(num_layers, num_experts, num_tokens, seed):
  num_layers = check_positive_int("num_layers", num_layers)
  num_experts = check_positive_int("num_experts", num_experts)
  num_tokens = check_positive_int("num_tokens", num_tokens)
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  return num_layers, num_experts, num_tokens, np.random.default_rng(seed)


def zipf_loads(num_layers: int, num_experts: int, *, exponent: float = 1.0, num_tokens: int = 65536,
               seed: int = 0) -> np.ndarray:
  """`[L, E]` int64 token counts whose expert popularity follows Zipf's law.

  Expert of rank r is picked with probability proportional to `r ** -exponent`; every layer
  draws its own random ranking of the experts and `num_tokens` multinomial picks.
  """
  num_layers, num_experts, num_tokens, rng = _check_common(num_layers, num_experts, num_tokens, seed)
  if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not np.isfinite(exponent):
    raise ValueError(f"exponent must be a finite number, got {exponent!r}")
  popularity = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(exponent)
  popularity /= popularity.sum()
  return np.stack([rng.multinomial(num_tokens, rng.permutation(popularity)) for _ in range(num_layers)])


def hot_expert_loads(num_layers: int, num_experts: int, *, hot_share: float = 0.3, num_tokens: int = 65536,
                     seed: int = 0) -> np.ndarray:
  """`[L, E]` int64 token counts where one random expert per layer takes `hot_share` of the tokens
  and the rest spread uniformly."""
  num_layers, num_experts, num_tokens, rng = _check_common(num_layers, num_experts, num_tokens, seed)
  if isinstance(hot_share, bool) or not isinstance(hot_share, numbers.Real) or not 0.0 <= hot_share <= 1.0:
    raise ValueError(f"hot_share must be a number in [0, 1], got {hot_share!r}")
  rows = []
  for _ in range(num_layers):
    p = np.full(num_experts, (1.0 - hot_share) / max(num_experts - 1, 1))
    p[rng.integers(num_experts)] = hot_share if num_experts > 1 else 1.0
    rows.append(rng.multinomial(num_tokens, p / p.sum()))
  return np.stack(rows)
