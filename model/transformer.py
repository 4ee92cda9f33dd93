"""DeepSeek-V3 in Flax NNX: embedding, decoder layers, final norm, output head, and the MTP modules.

Training: `model(tokens)` gives logits; `model.loss(tokens)` the next-token loss plus the MTP
loss, `mtp_weight / D * sum_k L_k` over D = num_nextn_predict_layers depths (depth k combines
the previous depth's hidden state at i with the embedding of token i + k and predicts token
i + k + 1, DeepSeek-V3's sequential MTP).

Inference: `prefill` runs the prompt (expanded attention) and writes every layer's latent rows
into its paged cache; `decode` appends the newest tokens' rows and runs absorbed attention over
the cache (`mla.flash_mla_with_kvcache`); `decode_hidden` then `mtp_decode` draft the token after
next from the MTP module over a cache layer of its own (speculative decoding). Caches are `[num_layers, num_pages, 64, 1,
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

  def init_cache(self, num_pages: int, dtype=jnp.bfloat16, *, mtp_depths: int = 0) -> jax.Array:
    """An empty paged latent cache for every layer: `[num_layers + mtp_depths, num_pages, 64, 1, kv_lora + rope]`.

    `mtp_depths` MTP modules' layers follow the main ones, for `mtp_decode` (speculative decoding).
    """
    c = self.config
    if not 0 <= mtp_depths <= len(self.mtp):
      raise ValueError(f"mtp_depths must be in [0, {len(self.mtp)}] (the model's MTP modules), got {mtp_depths}")
    layers = c.num_hidden_layers + mtp_depths
    return jnp.zeros((layers, num_pages, mla.metadata.PAGE_SIZE, 1, c.kv_lora_rank + c.qk_rope_head_dim), dtype)

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
    hidden, cache = self.decode_hidden(tokens, positions, cache, block_table, num_sms=num_sms,
                                       moe_kwargs=moe_kwargs, implementation=implementation)
    return self.logits(hidden), cache

  def logits(self, hidden) -> jax.Array:
    """The output head on main hidden states `[..., H]` (before the final norm): float32 `[..., vocab]`."""
    return self._head(hidden, self.norm).astype(jnp.float32)

  def mtp_logits(self, hidden, depth: int = 0) -> jax.Array:
    """The shared output head on MTP depth `depth`'s hidden states `[..., H]`: float32 `[..., vocab]`."""
    return self._head(hidden, self.mtp[depth].shared_head_norm).astype(jnp.float32)

  def decode_hidden(self, tokens, positions, cache, block_table, *, num_sms: int | None = None, moe_kwargs=None,
                    implementation: str | None = None):
    """`decode` without the output head: `(hidden [b, s_q, H] before the final norm, cache)`,
    which `mtp_decode` continues from."""
    _check_tokens(tokens, positions, vocab_size=self.config.vocab_size)
    attend = self._attention_plan(positions, num_sms)
    x = self.embed_tokens(tokens)
    for i, layer in enumerate(self.layers):
      x, cache = self._decode_layer(layer, i, x, positions, cache, block_table, attend, moe_kwargs, implementation)
    return x, cache

  def mtp_decode(self, hidden, next_tokens, positions, cache, block_table, *, depth: int = 0,
                 num_sms: int | None = None, moe_kwargs=None, implementation: str | None = None):
    """One MTP depth over the paged cache: drafts the token after next (speculative decoding).

    Position i combines the main model's hidden state at i with the embedding of token i + 1
    and predicts token i + 2, as in training (`loss`). Its latent rows go to cache layer
    `num_hidden_layers + depth` (`init_cache(..., mtp_depths=depth + 1)`). The logits of a
    position are `mtp_logits(hidden[:, i], depth)`: only the positions drafted from need them.

    Args:
      hidden: `[b, s_q, H]` from `decode_hidden` (depth 0) or the previous depth.
      next_tokens: `[b, s_q]` int32, the token after each position.
      positions, cache, block_table: as in `decode`.
      depth: which MTP module.

    Returns:
      `(hidden [b, s_q, H], cache)`; the hidden states also feed depth + 1.
    """
    if not 0 <= depth < len(self.mtp):
      raise ValueError(f"depth must be in [0, {len(self.mtp)}) (the model's MTP modules), got {depth}")
    c = self.config
    if cache.shape[0] <= c.num_hidden_layers + depth:
      raise ValueError(f"cache has {cache.shape[0]} layers; MTP depth {depth} needs layer "
                       f"{c.num_hidden_layers + depth}: build it with init_cache(..., mtp_depths={depth + 1})")
    _check_tokens(next_tokens, positions, vocab_size=c.vocab_size)
    module = self.mtp[depth]
    x = module.eh_proj(jnp.concatenate([module.enorm(self.embed_tokens(next_tokens)), module.hnorm(hidden)], axis=-1))
    x, cache = self._decode_layer(module.block, c.num_hidden_layers + depth, x, positions, cache, block_table,
                                  self._attention_plan(positions, num_sms), moe_kwargs, implementation)
    return x, cache

  def _attention_plan(self, positions, num_sms):
    """`(seqlens [b], FlashMLA's tile-scheduler metadata)`, shared by every layer of a step."""
    seqlens = positions[:, -1] + 1
    kwargs = {} if num_sms is None else {"num_sms": num_sms}
    return seqlens, mla.get_mla_metadata(seqlens, positions.shape[1] * self.config.num_attention_heads, 1, **kwargs)

  def _decode_layer(self, layer, index, x, positions, cache, block_table, attend, moe_kwargs, implementation):
    """Writes the layer's latent rows for `x`'s tokens into cache layer `index`, then runs it."""
    seqlens, metadata = attend
    rows = layer.self_attn.latent(layer.input_layernorm(x), positions)
    cache = cache.at[index].set(write_cache(cache[index], block_table, positions, rows))
    x = layer.decode(x, positions, cache[index], block_table, seqlens, metadata, moe_kwargs=moe_kwargs,
                     implementation=implementation)
    return x, cache


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
