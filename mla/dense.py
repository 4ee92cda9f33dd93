"""The plain dense oracle of MLA decoding: gather every page of a request, mask, softmax.

It shares nothing with the split-KV path but the cache format, computes in float32, and is
what the tests judge every implementation against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mla.fp8_cache import unpack
from mla.metadata import PAGE_SIZE


@functools.partial(jax.jit, static_argnames=("head_dim_v", "causal", "is_fp8_kvcache"))
def dense_decode(q, k_cache, block_table, cache_seqlens, *, head_dim_v: int, softmax_scale: float,
                 causal: bool, is_fp8_kvcache: bool) -> tuple[jax.Array, jax.Array]:
  """Attention of each request's queries over its first `cache_seqlens[r]` cached tokens.

  Args:
    q: `[batch, seq_q, heads_q, dim_qk]` bfloat16 or float16.
    k_cache: `[num_blocks, 64, heads_k, dim_qk]` in q's dtype, or `[..., 656]` uint8 when
      `is_fp8_kvcache` (dequantized to q's dtype first, as a kernel would).
    block_table: `[batch, max_blocks]` int32; entries past a request's length are never read.
    cache_seqlens: `[batch]` int32.
    head_dim_v: V is `k[..., :head_dim_v]`.
    softmax_scale: multiplies q.k.
    causal: query i of s_q sees keys `< len - s_q + i + 1`.
    is_fp8_kvcache: the cache is in the 656-byte FP8 format.

  Returns:
    `(out [batch, seq_q, heads_q, head_dim_v] q.dtype, lse [batch, heads_q, seq_q] float32)`,
    natural-log lse; a query with no visible key gets out = 0 and lse = +inf.
  """
  batch, seq_q, heads_q, dim_qk = q.shape
  out_dtype = q.dtype
  heads_k = k_cache.shape[2]
  max_blocks = block_table.shape[1]
  tokens = max_blocks * PAGE_SIZE
  used_blocks = (cache_seqlens + PAGE_SIZE - 1) // PAGE_SIZE
  pages = jnp.where(jnp.arange(max_blocks)[None, :] < used_blocks[:, None], block_table, 0)
  k = k_cache[pages].reshape(batch, tokens, heads_k, -1)  # [b, T, h_kv, dim]
  if is_fp8_kvcache:
    k = unpack(k, q.dtype)
  k = k.astype(jnp.float32)
  q = q.astype(jnp.float32).reshape(batch, seq_q, heads_k, heads_q // heads_k, dim_qk)

  position = jnp.arange(tokens)
  limit = jnp.broadcast_to(cache_seqlens[:, None], (batch, seq_q))
  if causal:
    limit = limit - seq_q + 1 + jnp.arange(seq_q)[None, :]
  visible = position[None, None, :] < limit[:, :, None]  # [b, s_q, T]
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k) * softmax_scale
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)  # [b, h_kv, g, s_q]; -inf when nothing is visible
  has_key = jnp.broadcast_to(visible.any(-1)[:, None, None], lse.shape)  # not isfinite: NaN must stay NaN
  probs = jnp.where(visible[:, None, None], jnp.exp(scores - jnp.where(has_key, lse, 0)[..., None]), 0.0)
  in_length = position[None, :] < cache_seqlens[:, None]
  v = jnp.where(in_length[:, :, None, None], k[..., :head_dim_v], 0.0)  # pages past the length may be NaN
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(batch, seq_q, heads_q, head_dim_v)
  lse = jnp.where(has_key, lse, jnp.inf).reshape(batch, heads_q, seq_q)
  return out.astype(out_dtype), lse
