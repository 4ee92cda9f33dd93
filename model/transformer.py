"""DeepSeek-V3 in Flax NNX: embedding, decoder layers, final norm, output head, and the MTP modules.

Training: `model(tokens)` gives logits; `model.loss(tokens)` the next-token loss plus the MTP
loss, `mtp_weight / D * sum_k L_k` over D = num_nextn_predict_layers depths (depth k combines
the previous depth's hidden state at i with the embedding of token i + k and predicts token
i + k + 1, DeepSeek-V3's sequential MTP).

Inference: `prefill` runs the prompt (expanded attention) and writes every layer's latent rows
into its paged cache; `decode` appends the newest tokens' rows and runs absorbed attention over
the cache (`mla.flash_mla_with_kvcache`). Caches are `[num_layers, num_pages, 64, 1,
kv_lora_rank + qk_rope_head_dim]`, bf16 by default.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mla
from model.config import ModelConfig
from model.layers.attention import write_cache
from model.layers.block import DecoderLayer
from model.layers.norm import RMSNorm


class LossOutput(NamedTuple):
  loss: jax.Array  # [] main + weighted MTP
  main: jax.Array  # [] next-token cross entropy
  mtp: jax.Array  # [D] cross entropy per MTP depth
  expert_counts: jax.Array  # [num_moe_layers, E] int32, for balancer.ExpertLoad


class MTPModule(nnx.Module):
  """One MTP depth: `h' = block(eh_proj([enorm(emb(next token)); hnorm(h)]))` (DeepSeek's order), read out through its own norm."""

  def __init__(self, config: ModelConfig, depth: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               fp8_weights: bool = False):
    h = config.hidden_size
    self.enorm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.hnorm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.eh_proj = nnx.Linear(2 * h, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block = DecoderLayer(config, config.num_hidden_layers + depth, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype, fp8_weights=fp8_weights)
    self.shared_head_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, hidden, next_embeds, positions, moe_kwargs=None):
    x = self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1))
    return self.block(x, positions, moe_kwargs=moe_kwargs)


class DeepseekV3(nnx.Module):
  """The model.

  Args:
    config: the hyperparameters.
    rngs: initialization.
    dtype: activations.
    param_dtype: weights.
    fp8_weights: the attention and MLP projections (routed and shared experts included) hold
      FP8 weights as DeepSeek's FP8 checkpoint stores them, e4m3 with 128x128 block scales, and
      run FP8 GEMMs: inference only (`from_pretrained(..., fp8_weights=True)`). Embeddings,
      norms, the router, the output head and the MTP projection stay in param_dtype.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               fp8_weights: bool = False):
    self.config = config
    c = config
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(c, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                         fp8_weights=fp8_weights) for i in range(c.num_hidden_layers)])
    self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = None if c.tie_word_embeddings else nnx.Linear(
        c.hidden_size, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mtp = nnx.List([MTPModule(c, k, rngs=rngs, dtype=dtype, param_dtype=param_dtype, fp8_weights=fp8_weights)
                         for k in range(c.num_nextn_predict_layers)])

  def _head(self, hidden, norm):
    normed = norm(hidden)
    if self.lm_head is None:
      return self.embed_tokens.attend(normed)
    return self.lm_head(normed)

  def hidden_states(self, tokens, positions=None, *, segment_ids=None, moe_kwargs=None):
    """`tokens [b, s]` -> `(hidden [b, s, H] before the final norm, expert_counts [num_moe_layers, E])`."""
    _check_tokens(tokens, positions, vocab_size=self.config.vocab_size)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self.embed_tokens(tokens)
    counts = []
    for layer in self.layers:
      x, layer_counts = layer(x, positions, segment_ids=segment_ids, moe_kwargs=moe_kwargs)
      if layer_counts is not None:
        counts.append(layer_counts)
    return x, _stack_counts(counts, self.config)

  def __call__(self, tokens, positions=None, *, segment_ids=None, moe_kwargs=None) -> jax.Array:
    """`tokens [b, s]` int32 -> logits `[b, s, vocab]` (float32)."""
    hidden, _ = self.hidden_states(tokens, positions, segment_ids=segment_ids, moe_kwargs=moe_kwargs)
    return self._head(hidden, self.norm).astype(jnp.float32)

  def loss(self, tokens, *, mtp_weight: float = 0.3, loss_mask=None, moe_kwargs=None) -> LossOutput:
    """Next-token cross entropy plus `mtp_weight / D * sum_k` of the MTP depths' (mean over valid positions).

    Args:
      tokens: `[b, s]` int32.
      mtp_weight: DeepSeek-V3's lambda (0.3 early in its training, then 0.1).
      loss_mask: optional `[b, s]` bool, which target tokens count.
      moe_kwargs: passed to every MoE layer (e.g. `axis_name` under shard_map).
    """
    b, s = tokens.shape
    mask = jnp.ones((b, s), bool) if loss_mask is None else loss_mask
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, counts = self.hidden_states(tokens, positions, moe_kwargs=moe_kwargs)

    def cross_entropy(h, norm, shift):  # predicts tokens[:, i + shift] from position i
      logits = self._head(h[:, :s - shift], norm).astype(jnp.float32)
      target, valid = tokens[:, shift:], mask[:, shift:]
      per_token = optax.softmax_cross_entropy_with_integer_labels(logits, target)
      return jnp.sum(per_token * valid) / jnp.maximum(valid.sum(), 1)

    main = cross_entropy(hidden, self.norm, 1)
    mtp_losses = []
    for k, module in enumerate(self.mtp, start=1):
      # Depth k at position i: h^{k-1}_i and emb(t_{i+k}); predicts t_{i+k+1} (positions past the end padded).
      next_embeds = self.embed_tokens(jnp.pad(tokens[:, k:], ((0, 0), (0, k))))
      hidden, layer_counts = module(hidden, next_embeds, positions, moe_kwargs=moe_kwargs)
      if layer_counts is not None:
        counts = jnp.concatenate([counts, layer_counts[None]], axis=0)
      mtp_losses.append(cross_entropy(hidden, module.shared_head_norm, k + 1))
    mtp = jnp.stack(mtp_losses) if mtp_losses else jnp.zeros((0,), jnp.float32)
    total = main + (mtp_weight * mtp.mean() if mtp_losses else 0.0)
    return LossOutput(total, main, mtp, counts)

  def init_cache(self, num_pages: int, dtype=jnp.bfloat16) -> jax.Array:
    """An empty paged latent cache for every layer: `[num_layers, num_pages, 64, 1, kv_lora + rope]`."""
    c = self.config
    return jnp.zeros((c.num_hidden_layers, num_pages, mla.metadata.PAGE_SIZE, 1,
                      c.kv_lora_rank + c.qk_rope_head_dim), dtype)

  def prefill(self, tokens, positions, cache, block_table, *, moe_kwargs=None):
    """Runs prompts and writes their latent rows.

    Args:
      tokens: `[b, s]` int32 prompts (padding where positions is -1).
      positions: `[b, s]` int32, `0..len-1`, -1 for padding (not written, not attended).
      cache: from `init_cache`.
      block_table: `[b, max_blocks]` int32 pages of each request.

    Returns:
      `(logits [b, s, vocab] float32, cache)`.
    """
    _check_tokens(tokens, positions, vocab_size=self.config.vocab_size)
    x = self.embed_tokens(tokens)
    segment_ids = (positions >= 0).astype(jnp.int32)  # padding attends only to padding
    safe = jnp.maximum(positions, 0)
    for i, layer in enumerate(self.layers):
      rows = layer.self_attn.latent(layer.input_layernorm(x), safe)
      cache = cache.at[i].set(write_cache(cache[i], block_table, positions, rows))
      x, _ = layer(x, safe, segment_ids=segment_ids, moe_kwargs=moe_kwargs)
    return self._head(x, self.norm).astype(jnp.float32), cache

  def decode(self, tokens, positions, cache, block_table, *, num_sms: int | None = None, moe_kwargs=None,
             implementation: str | None = None):
    """Appends the newest tokens and attends over each request's whole cache.

    Args:
      tokens: `[b, s_q]` int32 (s_q > 1 is causal: MTP-style multi-token decoding, or a later
        chunk of a prompt, chunked prefill, over the chunks already in the cache).
      positions: `[b, s_q]` int32, consecutive; the request's length after them is `positions[:, -1] + 1`.
      cache, block_table: as in prefill.
      num_sms: for `mla.get_mla_metadata` (default: its own).
      implementation: the mla backend.

    Returns:
      `(logits [b, s_q, vocab] float32, cache)`.
    """
    c = self.config
    _check_tokens(tokens, positions, vocab_size=c.vocab_size)
    seqlens = positions[:, -1] + 1
    kwargs = {} if num_sms is None else {"num_sms": num_sms}
    metadata = mla.get_mla_metadata(seqlens, tokens.shape[1] * c.num_attention_heads, 1, **kwargs)
    x = self.embed_tokens(tokens)
    for i, layer in enumerate(self.layers):
      rows = layer.self_attn.latent(layer.input_layernorm(x), positions)
      cache = cache.at[i].set(write_cache(cache[i], block_table, positions, rows))
      x = layer.decode(x, positions, cache[i], block_table, seqlens, metadata, moe_kwargs=moe_kwargs,
                       implementation=implementation)
    return self._head(x, self.norm).astype(jnp.float32), cache


def _check_tokens(tokens, positions=None, *, vocab_size: int) -> None:
  """ValueError naming the argument: tokens `[b, s]` integer, positions the same shape (when given)."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer [batch, seq], got {tokens.dtype} {tokens.shape}")
  if positions is not None and (positions.shape != tokens.shape or not jnp.issubdtype(positions.dtype, jnp.integer)):
    raise ValueError(f"positions must be integer {tokens.shape} like tokens, got {positions.dtype} {positions.shape}")
  if not isinstance(tokens, jax.core.Tracer) and tokens.size:
    values = np.asarray(tokens)  # concrete: checked on the host, also while an outer jit traces
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
      raise ValueError(f"tokens hold ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")


def _stack_counts(counts, config: ModelConfig) -> jax.Array:
  if counts:
    return jnp.stack(counts)
  return jnp.zeros((0, config.n_routed_experts or 0), jnp.int32)
