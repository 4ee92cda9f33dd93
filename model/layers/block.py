"""A DeepSeek-V3 decoder layer: pre-norm MLA and pre-norm MLP or MoE, each with a residual."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import expert_parallel as ep
from model.config import ModelConfig
from model.layers.attention import MLA
from model.layers.mlp import MLP
from model.layers.norm import RMSNorm


def moe_config(config: ModelConfig) -> ep.MoEConfig:
  return ep.MoEConfig(hidden_size=config.hidden_size, moe_intermediate_size=config.moe_intermediate_size,
                      n_shared_experts=config.n_shared_experts, gate=config.gate_config())


class DecoderLayer(nnx.Module):
  """`x + attn(norm(x))`, then `+ mlp(norm(.))`; the MLP is `ep.MoE` where `config.is_moe_layer(index)`."""

  def __init__(self, config: ModelConfig, index: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, fp8_weights: bool = False):
    h = config.hidden_size
    self.input_layernorm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = MLA(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, fp8_weights=fp8_weights)
    self.post_attention_layernorm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.is_moe = config.is_moe_layer(index)
    self.fp8_weights = fp8_weights
    # Sizes the FP8 expert GEMMs cannot take run ragged_dot on the dequantized experts instead.
    self.fp8_experts_fit = ep.experts.fp8_fits(h, config.moe_intermediate_size)
    if self.is_moe:
      self.mlp = ep.MoE(moe_config(config), rngs=rngs, dtype=param_dtype, score_bias=config.uses_score_bias,
                        fp8_weights=fp8_weights)
    else:
      self.mlp = MLP(h, config.intermediate_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                     fp8_weights=fp8_weights)

  def feed_forward(self, x: jax.Array, moe_kwargs: dict) -> tuple[jax.Array, jax.Array | None]:
    """The MLP half on normed input `[b, s, H]`: `(out, expert_counts [E] or None)`."""
    if not self.is_moe:
      return self.mlp(x), None
    if self.fp8_weights and self.fp8_experts_fit:  # stored FP8 experts run DeepGEMM's FP8 path unless told not to
      moe_kwargs = {"use_fp8": True, **moe_kwargs}
    result = self.mlp(x, **moe_kwargs)
    return result.out, result.expert_counts

  def __call__(self, x, positions, *, segment_ids=None, moe_kwargs=None) -> tuple[jax.Array, jax.Array | None]:
    """`x [b, s, H]` -> `(x [b, s, H], expert_counts [E] or None)` with expanded attention."""
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids=segment_ids)
    out, counts = self.feed_forward(self.post_attention_layernorm(x), moe_kwargs or {})
    return x + out, counts

  def decode(self, x, positions, k_cache, block_table, cache_seqlens, metadata, *, moe_kwargs=None,
             implementation=None) -> jax.Array:
    """The newest tokens `[b, s_q, H]` with absorbed attention over this layer's latent cache."""
    x = x + self.self_attn.decode(self.input_layernorm(x), positions, k_cache, block_table, cache_seqlens,
                                  *metadata, implementation=implementation)
    out, _ = self.feed_forward(self.post_attention_layernorm(x), moe_kwargs or {})
    return x + out
