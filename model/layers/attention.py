"""Multi-head latent attention (MLA), DeepSeek-V3's, in two forms with equal outputs.

- `MLA.__call__` (training, prefill), *expanded*: the latent `c = norm(x W_DKV)` is
  up-projected to per-head K (NoPE part) and V; standard causal attention over
  `[q_nope, q_rope] . [k_nope, k_rope]`.
- `MLA.decode`, *absorbed*: `q_nope W_UK` is taken into the 512-d latent space, attention runs
  over the paged latent cache (`[..., kv_lora_rank + qk_rope_head_dim]` = 576 per token, written
  by `MLA.latent`) with `mla.flash_mla_with_kvcache`, and the latent output goes through W_UV.

Weights follow Hugging Face's DeepseekV3Attention names (kernels are `[in, out]`):
q_a_proj, q_a_layernorm, q_b_proj (or q_proj without q LoRA), kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj (`[kv_lora_rank, heads * (qk_nope + v)]`), o_proj. With
`fp8_weights` the projections are `FP8Linear`s holding an FP8 checkpoint's weights as stored;
the absorbed form dequantizes kv_b_proj, whose halves it uses as matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import mla
from model.config import ModelConfig
from model.layers.linear import kernel, projection
from model.layers.norm import RMSNorm
from model.layers.rope import apply_rotary, softmax_scale, yarn_inv_freq

PAGE = mla.metadata.PAGE_SIZE


def rotary_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(cos, sin) [..., d_rope / 2]` float32 at integer `positions [...]`, YaRN-scaled."""
  inv_freq, multiplier = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * multiplier, jnp.sin(angles) * multiplier


class MLA(nnx.Module):
  """DeepSeek-V3's attention block (without the residual and the input norm)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               fp8_weights: bool = False):
    self.config = config
    c = config
    linear = lambda i, o: projection(i, o, rngs=rngs, dtype=dtype, param_dtype=param_dtype, fp8_weights=fp8_weights)
    if c.q_lora_rank is None:
      self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.qk_head_dim)
    else:
      self.q_a_proj = linear(c.hidden_size, c.q_lora_rank)
      self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps, param_dtype=param_dtype)
      self.q_b_proj = linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim)
    self.kv_a_proj_with_mqa = linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
    self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps, param_dtype=param_dtype)
    self.kv_b_proj = linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim))
    self.o_proj = linear(c.num_attention_heads * c.v_head_dim, c.hidden_size)

  def _queries(self, x, positions):
    """`x [b, s, H]` -> `(q_nope [b, s, h, nope], q_rope [b, s, h, rope])`, q_rope rotated."""
    c = self.config
    q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(*x.shape[:-1], c.num_attention_heads, c.qk_head_dim)
    q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, apply_rotary(q_rope, *rotary_tables(c, positions), interleaved=c.rope_interleave)

  def latent(self, x, positions) -> jax.Array:
    """What the paged cache holds per token: `[b, s, kv_lora_rank + rope]` = (normed latent, rotated k_rope)."""
    c = self.config
    compressed = self.kv_a_proj_with_mqa(x)
    latent = self.kv_a_layernorm(compressed[..., :c.kv_lora_rank])
    k_rope = apply_rotary(compressed[..., None, c.kv_lora_rank:], *rotary_tables(c, positions),
                          interleaved=c.rope_interleave)[..., 0, :]
    return jnp.concatenate([latent, k_rope], axis=-1)

  def _up_projections(self):
    """kv_b_proj as `(W_UK [kv_lora, h, nope], W_UV [kv_lora, h, v])`."""
    c = self.config
    w = kernel(self.kv_b_proj).reshape(c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)
    return w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]

  def __call__(self, x, positions, *, segment_ids=None) -> jax.Array:
    """Expanded causal attention.

    Args:
      x: `[b, s, H]`.
      positions: `[b, s]` int32 token positions (key j is visible to query i when
        positions[j] <= positions[i] and, with segment_ids, both are in the same segment).
      segment_ids: optional `[b, s]` int32, for packed sequences.

    Returns:
      `[b, s, H]` in x's dtype.
    """
    c = self.config
    q_nope, q_rope = self._queries(x, positions)
    rows = self.latent(x, positions)
    kv = self.kv_b_proj(rows[..., :c.kv_lora_rank]).reshape(*x.shape[:-1], c.num_attention_heads, -1)
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k_rope = rows[..., c.kv_lora_rank:]
    f32 = lambda a: a.astype(jnp.float32)
    scores = (jnp.einsum("bqhd,bkhd->bhqk", f32(q_nope), f32(k_nope))
              + jnp.einsum("bqhd,bkd->bhqk", f32(q_rope), f32(k_rope))) * softmax_scale(c)
    visible = positions[:, None, :, None] >= positions[:, None, None, :]
    if segment_ids is not None:
      visible &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, f32(v)).astype(x.dtype)
    return self.o_proj(out.reshape(*x.shape[:-1], -1))

  def decode(self, x, positions, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, *,
             implementation: str | None = None) -> jax.Array:
    """Absorbed attention of the newest tokens over the paged latent cache.

    Args:
      x: `[b, s_q, H]`, the s_q newest tokens of each request (their latents already in the cache).
      positions: `[b, s_q]` int32, their positions (`cache_seqlens - s_q + i`).
      k_cache: `[num_pages, 64, 1, kv_lora_rank + rope]` bfloat16, from `MLA.latent` via `write_cache`.
      block_table, cache_seqlens, tile_scheduler_metadata, num_splits: as `mla.flash_mla_with_kvcache`.
      implementation: the mla backend.

    Returns:
      `[b, s_q, H]` in x's dtype.
    """
    c = self.config
    q_nope, q_rope = self._queries(x, positions)
    w_uk, w_uv = self._up_projections()
    q_latent = jnp.einsum("bshn,chn->bshc", q_nope.astype(jnp.float32), w_uk.astype(jnp.float32))
    q = jnp.concatenate([q_latent, q_rope.astype(jnp.float32)], axis=-1).astype(k_cache.dtype)
    out_latent, _ = mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, c.kv_lora_rank,
                                               tile_scheduler_metadata, num_splits, softmax_scale=softmax_scale(c),
                                               causal=x.shape[1] > 1, implementation=implementation)
    out = jnp.einsum("bshc,chv->bshv", out_latent.astype(jnp.float32), w_uv.astype(jnp.float32)).astype(x.dtype)
    return self.o_proj(out.reshape(*x.shape[:-1], -1))


def write_cache(k_cache, block_table, positions, rows) -> jax.Array:
  """Writes latent rows into the paged cache.

  Args:
    k_cache: `[num_pages, 64, 1, D]`.
    block_table: `[b, max_blocks]` int32.
    positions: `[b, s]` int32 positions of the rows (negative: skipped, e.g. padding).
    rows: `[b, s, D]`.

  Returns:
    The updated cache (row i of request r at page `block_table[r, pos // 64]`, slot `pos % 64`).
  """
  page = jnp.take_along_axis(block_table, jnp.maximum(positions, 0) // PAGE, axis=1)
  page = jnp.where(positions >= 0, page, k_cache.shape[0])  # out of range: dropped
  return k_cache.at[page, positions % PAGE, 0].set(rows.astype(k_cache.dtype), mode="drop")
