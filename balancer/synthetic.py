"""Synthetic expert loads for the demo, the benchmark and the tests (token counts, int64)."""

from __future__ import annotations

import numpy as np

from balancer.validation import check_positive_int


def zipf_loads(num_layers: int, num_experts: int, *, exponent: float = 1.0, num_tokens: int = 65536,
               seed: int = 0) -> np.ndarray:
  """`[L, E]` int64 token counts whose expert popularity follows Zipf's law.

  Expert of rank r is picked with probability proportional to `r ** -exponent`; every layer
  draws its own random ranking of the experts and `num_tokens` multinomial picks.
  """
  num_layers = check_positive_int("num_layers", num_layers)
  num_experts = check_positive_int("num_experts", num_experts)
  rng = np.random.default_rng(seed)
  popularity = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(exponent)
  popularity /= popularity.sum()
  return np.stack([rng.multinomial(num_tokens, rng.permutation(popularity)) for _ in range(num_layers)])


def hot_expert_loads(num_layers: int, num_experts: int, *, hot_share: float = 0.3, num_tokens: int = 65536,
                     seed: int = 0) -> np.ndarray:
  """`[L, E]` int64 token counts where one random expert per layer takes `hot_share` of the tokens
  and the rest spread uniformly."""
  num_layers = check_positive_int("num_layers", num_layers)
  num_experts = check_positive_int("num_experts", num_experts)
  if not 0.0 <= hot_share <= 1.0:
    raise ValueError(f"hot_share must lie in [0, 1], got {hot_share}")
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(num_layers):
    p = np.full(num_experts, (1.0 - hot_share) / max(num_experts - 1, 1))
    p[rng.integers(num_experts)] = hot_share if num_experts > 1 else 1.0
    rows.append(rng.multinomial(num_tokens, p / p.sum()))
  return np.stack(rows)
