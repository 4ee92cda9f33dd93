"""Sampling the next token on device: greedy, temperature, top-k and top-p, one row per request.

Each row's randomness is `fold_in(key(seed), position)`: a request with a seed gets the same
tokens whatever else is in the batch, whichever batch bucket it lands in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, temperature, top_k, top_p, seeds, positions, *, vocab_limit: int):
  """The next token of each row.

  Args:
    logits: `[b, vocab]` float32.
    temperature: `[b]` float32; 0 is greedy.
    top_k: `[b]` int32; 0 keeps every token.
    top_p: `[b]` float32 in (0, 1].
    seeds: `[b]` uint32, each request's seed.
    positions: `[b]` int32, the position the sampled token will take.
    vocab_limit: tokens at or past it are never sampled (the tokenizer's vocabulary may be
      smaller than the model's).

  Returns:
    `[b]` int32 token ids.
  """
  vocab = logits.shape[-1]
  logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
  return jax.vmap(_row)(logits, temperature, top_k, top_p, seeds, positions)


def _row(logits, temperature, top_k, top_p, seed, position):
  greedy = jnp.argmax(logits).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled)  # most likely first
  ranked = scaled[order]
  rank = jnp.arange(ranked.shape[0])
  keep = (top_k == 0) | (rank < top_k)
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf))
  keep &= jnp.cumsum(probs) - probs < top_p  # the smallest prefix reaching top_p (the first always stays)
  key = jax.random.fold_in(jax.random.key(seed), position)
  choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf))
  return jnp.where(temperature == 0, greedy, order[choice].astype(jnp.int32))
