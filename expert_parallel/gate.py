"""DeepSeek's MoE gate: scores, group-limited top-k routing, and the routing weights.

As DeepSeek-V3's reference inference code routes (V2's group-limited greedy is the same with no
bias and softmax scores):
  scores   = sigmoid(x @ W.T)  (or softmax)            [T, E] float32
  choice   = scores + e_score_correction_bias          (selection only)
  group    = sum of the top-2 `choice` of each of n_group groups (max without a bias)
  keep the top `topk_group` groups; the top-k experts among them by `choice`
  weights  = scores of those experts (not biased), normalized to sum 1 if norm_topk_prob,
             times routed_scaling_factor
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """The routing fields of a DeepSeek config.json (V3 defaults: 256 experts, 8 groups, top-4 groups, top-8)."""
  num_experts: int
  num_experts_per_tok: int
  n_group: int = 1
  topk_group: int = 1
  scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0

  def __post_init__(self):
    for name in ("num_experts", "num_experts_per_tok", "n_group", "topk_group"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.num_experts % self.n_group:
      raise ValueError(f"num_experts={self.num_experts} must be a multiple of n_group={self.n_group}")
    if self.n_group > 1 and self.num_experts // self.n_group < 2:
      raise ValueError(f"n_group={self.n_group} leaves fewer than 2 experts per group (groups score by their top 2)")
    if self.topk_group > self.n_group:
      raise ValueError(f"topk_group={self.topk_group} must be at most n_group={self.n_group}")
    if self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group="
                       f"{self.topk_group} groups")
    if self.scoring_func not in ("sigmoid", "softmax"):
      raise ValueError(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")


def route(x, weight, bias, config: GateConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Routes tokens to experts.

  Args:
    x: `[T, H]` activations (any float dtype; the gate runs in float32).
    weight: `[E, H]` the gate's weight.
    bias: `[E]` float32 e_score_correction_bias (used for selection only), or None.
    config: the routing fields.

  Returns:
    `(topk_idx [T, K] int32, topk_weights [T, K] float32, scores [T, E] float32)`.
  """
  logits = jnp.einsum("th,eh->te", x.astype(jnp.float32), weight.astype(jnp.float32))
  scores = jax.nn.sigmoid(logits) if config.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
  choice = scores if bias is None else scores + bias.astype(jnp.float32)
  tokens = x.shape[0]
  if config.n_group > 1:
    grouped = choice.reshape(tokens, config.n_group, -1)
    group_score = grouped.max(-1) if bias is None else jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, top_groups = jax.lax.top_k(group_score, config.topk_group)
    kept = jnp.zeros((tokens, config.n_group), bool).at[jnp.arange(tokens)[:, None], top_groups].set(True)
    choice = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(tokens, -1)
  _, topk_idx = jax.lax.top_k(choice, config.num_experts_per_tok)
  topk_weights = jnp.take_along_axis(scores, topk_idx, axis=1)
  if config.norm_topk_prob and config.num_experts_per_tok > 1:
    topk_weights = topk_weights / (topk_weights.sum(-1, keepdims=True) + 1e-20)
  return topk_idx.astype(jnp.int32), topk_weights * config.routed_scaling_factor, scores
