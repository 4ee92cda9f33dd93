"""Every bad input to `flash_mla_with_kvcache` raises a ValueError that names the argument."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import mla

Q = jnp.zeros((2, 1, 16, 576), jnp.bfloat16)
K = jnp.zeros((4, 64, 1, 576), jnp.bfloat16)
TABLE = jnp.zeros((2, 2), jnp.int32)
LENS = jnp.array([10, 100], jnp.int32)
META, SPLITS = mla.get_mla_metadata(LENS, 16, 1)

CASES = [
    (dict(q=Q[0]), r"q must be \[batch, seq_q, heads_q, dim_qk\]"),
    (dict(q=Q.astype(jnp.float32)), "q must be bfloat16 or float16"),
    (dict(k_cache=K[0]), "k_cache must be"),
    (dict(k_cache=jnp.zeros((4, 32, 1, 576), jnp.bfloat16)), "page size .* must be 64"),
    (dict(k_cache=K.astype(jnp.float16)), "k_cache must have q's dtype"),
    (dict(k_cache=jnp.zeros((4, 64, 1, 512), jnp.bfloat16)), "k_cache's last dim 512 must equal q's dim_qk 576"),
    (dict(k_cache=jnp.zeros((4, 64, 3, 576), jnp.bfloat16)), r"q's heads \(16\) must be a multiple of"),
    (dict(head_dim_v=577), "head_dim_v=577 must not exceed dim_qk=576"),
    (dict(head_dim_v=0), "head_dim_v must be a positive int"),
    (dict(head_dim_v=512.0), "head_dim_v must be a positive int"),
    (dict(block_table=TABLE[:1]), r"block_table must be \[batch=2, max_blocks\]"),
    (dict(block_table=TABLE.astype(jnp.int16)), "block_table must be int32"),
    (dict(cache_seqlens=LENS[:1]), r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_seqlens=LENS.astype(jnp.float32)), "cache_seqlens must be int32"),
    (dict(tile_scheduler_metadata=META[:, :4]), r"tile_scheduler_metadata must be \[num_sm_parts, 8\]"),
    (dict(tile_scheduler_metadata=META.astype(jnp.float32)), "tile_scheduler_metadata must be int32"),
    (dict(num_splits=SPLITS[:2]), r"num_splits must have shape \(3,\)"),
    (dict(softmax_scale="0.1"), "softmax_scale must be a Python float"),
    (dict(softmax_scale=True), "softmax_scale must be a Python float"),
    (dict(block_table=TABLE[:, :0]), "at least one column"),
    (dict(k_cache=K[:0]), "at least one page"),
    (dict(cache_seqlens=jnp.array([10, 129], jnp.int32)), r"cache_seqlens\[1\]=129 must be in \[0, 128\]"),
    (dict(cache_seqlens=jnp.array([-1, 100], jnp.int32)), r"cache_seqlens\[0\]=-1"),
    (dict(is_fp8_kvcache=True), "k_cache must be uint8"),
    (dict(is_fp8_kvcache=True, k_cache=jnp.zeros((4, 64, 1, 600), jnp.uint8)), "656 bytes per token"),
    (dict(is_fp8_kvcache=True, k_cache=jnp.zeros((4, 64, 1, 656), jnp.uint8), q=Q[..., :512]),
     "dim_qk must be 576 with an FP8 cache"),
    (dict(implementation="cuda"), "implementation='cuda' is not available"),
]


@pytest.mark.parametrize("override,match", CASES)
def test_rejects(override, match):
  args = dict(q=Q, k_cache=K, block_table=TABLE, cache_seqlens=LENS, head_dim_v=512,
              tile_scheduler_metadata=META, num_splits=SPLITS) | override
  with pytest.raises(ValueError, match=match):
    mla.flash_mla_with_kvcache(**args)


def test_lists_are_converted_once():
  out, lse = mla.flash_mla_with_kvcache(Q, K, [[0, 1], [2, 3]], [10, 100], 512, META, SPLITS)
  assert out.shape == (2, 1, 16, 512) and lse.shape == (2, 16, 1)
