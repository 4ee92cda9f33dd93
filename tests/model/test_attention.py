"""MLA's two forms agree: expanded attention (training, prefill) and absorbed decode over the paged latent cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla
from model.config import ModelConfig
from model.layers import MLA, write_cache


@pytest.mark.parametrize("q_lora, fp8_weights", [(True, False), (False, False), (True, True)])
def test_absorbed_decode_over_the_paged_cache_equals_expanded_attention(q_lora, fp8_weights):
  cfg = ModelConfig.preset("tiny")
  if not q_lora:
    cfg = ModelConfig.from_hf({**cfg.to_hf(), "q_lora_rank": None})  # V2-Lite's direct q projection
  attn = MLA(cfg, rngs=nnx.Rngs(0), fp8_weights=fp8_weights)
  lengths, seq_q, batch = np.array([70, 131]), 2, 2
  longest = int(lengths.max())
  x = jax.random.normal(jax.random.key(1), (batch, longest, cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(longest, dtype=jnp.int32), (batch, longest))
  expanded = attn(x, positions)  # [b, longest, H]; request r's rows past its length are not used

  # Prefill: every token's latent row into a paged cache whose spare slots hold NaN.
  max_blocks = -(-longest // 64) + 1
  table = jnp.asarray(np.random.default_rng(0).permutation(batch * max_blocks).reshape(batch, max_blocks),
                      jnp.int32)
  width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  cache = jnp.full((batch * max_blocks, 64, 1, width), jnp.nan, jnp.bfloat16)
  valid = positions < jnp.asarray(lengths)[:, None]
  cache = write_cache(cache, table, jnp.where(valid, positions, -1), attn.latent(x, positions))

  # Decode the last seq_q tokens of each request, absorbed, over the cache.
  starts = lengths - seq_q
  x_q = jnp.stack([x[r, starts[r]:lengths[r]] for r in range(batch)])
  pos_q = jnp.asarray(np.stack([np.arange(s, s + seq_q) for s in starts]), jnp.int32)
  seqlens = jnp.asarray(lengths, jnp.int32)
  metadata = mla.get_mla_metadata(seqlens, seq_q * cfg.num_attention_heads, 1, num_sms=4)
  decoded = attn.decode(x_q, pos_q, cache, table, seqlens, *metadata)
  want = np.stack([np.asarray(expanded[r, starts[r]:lengths[r]]) for r in range(batch)])
  got = np.asarray(decoded, np.float32)
  assert not np.isnan(got).any()
  cos = (got * want).sum() / np.sqrt((got ** 2).sum() * (want ** 2).sum())
  if fp8_weights:
    # FP8 projections quantize their inputs per token; the expanded form also quantizes the latent
    # going into kv_b_proj, which the absorbed form folds in dequantized (as DeepSeek's absorb mode).
    # Measured: cosine 0.99922, max error 3.9% of the largest output.
    assert cos > 0.998
    return
  # The decode path runs in bf16 (flash_mla's dtype): agree to bf16's precision (measured: max error
  # 0.4% of the largest output, cosine 0.999995).
  np.testing.assert_allclose(got, want, rtol=0.05, atol=0.01 * np.abs(want).max())
  assert cos > 0.99998


def test_expanded_attention_is_causal_and_respects_segments():
  cfg = ModelConfig.preset("tiny")
  attn = MLA(cfg, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (1, 12, cfg.hidden_size), jnp.float32)
  positions = jnp.arange(12, dtype=jnp.int32)[None]
  full = attn(x, positions)
  # Changing a later token does not change earlier outputs.
  changed = attn(x.at[0, 8].set(0.0), positions)
  np.testing.assert_array_equal(full[0, :8], changed[0, :8])
  assert not np.allclose(full[0, 8:], changed[0, 8:])
  # Two packed segments equal two separate sequences.
  segments = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
  packed_positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
  packed = attn(x, packed_positions, segment_ids=segments)
  first = attn(x[:, :5], positions[:, :5])
  second = attn(x[:, 5:], positions[:, :7])
  np.testing.assert_allclose(packed[0, :5], first[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(packed[0, 5:], second[0], rtol=1e-5, atol=1e-6)
