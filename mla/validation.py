"""The one checker of `flash_mla_with_kvcache`'s arguments: every caller error is a ValueError naming the argument."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mla.fp8_cache import BYTES_PER_TOKEN, D_NOPE, D_ROPE
from mla.metadata import METADATA_SIZE, PAGE_SIZE

Q_DTYPES = (jnp.bfloat16, jnp.float16)


class DecodeArgs(NamedTuple):
  """The array arguments, converted to jax arrays, in `flash_mla_with_kvcache`'s order."""

  q: jax.Array
  k_cache: jax.Array
  block_table: jax.Array
  cache_seqlens: jax.Array
  tile_scheduler_metadata: jax.Array
  num_splits: jax.Array


class DecodeDims(NamedTuple):
  """Sizes of a checked decode call."""

  batch: int
  seq_q: int
  heads_q: int
  heads_k: int
  dim_qk: int
  dim_v: int
  max_blocks: int
  num_sm_parts: int


def _array(name: str, x) -> jax.Array:
  if isinstance(x, jax.Array):
    return x
  try:
    return jnp.asarray(x)
  except TypeError as err:
    raise ValueError(f"{name} must be an array: {err}") from None


def _int32(name: str, x, shape: tuple[int, ...], what: str) -> None:
  if x.dtype != jnp.int32:
    raise ValueError(f"{name} must be int32, got {x.dtype}")
  if tuple(x.shape) != shape:
    raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(x.shape)}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                      num_splits, softmax_scale, is_fp8_kvcache) -> tuple[DecodeArgs, DecodeDims]:
  """Checks every argument once; returns the arrays (converted) and the sizes."""
  q, k_cache = _array("q", q), _array("k_cache", k_cache)
  block_table, cache_seqlens = _array("block_table", block_table), _array("cache_seqlens", cache_seqlens)
  metadata, num_splits = _array("tile_scheduler_metadata", tile_scheduler_metadata), _array("num_splits", num_splits)
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, seq_q, heads_q, dim_qk], got shape {q.shape}")
  if q.dtype not in Q_DTYPES:
    raise ValueError(f"q must be bfloat16 or float16, got {q.dtype}")
  batch, seq_q, heads_q, dim_qk = q.shape
  if k_cache.ndim != 4:
    raise ValueError(f"k_cache must be [num_blocks, page_size, heads_k, dim], got shape {k_cache.shape}")
  num_blocks, page_size, heads_k, dim_k = k_cache.shape
  if page_size != PAGE_SIZE:
    raise ValueError(f"k_cache's page size (dim 1) must be {PAGE_SIZE}, got {page_size}")
  if is_fp8_kvcache:
    if k_cache.dtype not in (jnp.uint8, jnp.float8_e4m3fn):
      raise ValueError(f"k_cache must be uint8 (or float8_e4m3fn) with is_fp8_kvcache=True, got {k_cache.dtype}")
    if dim_k != BYTES_PER_TOKEN:
      raise ValueError(f"an FP8 k_cache has {BYTES_PER_TOKEN} bytes per token (mla.quantize_kv_cache), got {dim_k}")
    if dim_qk != D_NOPE + D_ROPE:
      raise ValueError(f"q's dim_qk must be {D_NOPE + D_ROPE} with an FP8 cache, got {dim_qk}")
  else:
    if k_cache.dtype != q.dtype:
      raise ValueError(f"k_cache must have q's dtype {q.dtype}, got {k_cache.dtype} "
                       "(an FP8 cache needs is_fp8_kvcache=True)")
    if dim_k != dim_qk:
      raise ValueError(f"k_cache's last dim {dim_k} must equal q's dim_qk {dim_qk}")
  if heads_k < 1 or heads_q % heads_k:
    raise ValueError(f"q's heads ({heads_q}) must be a multiple of k_cache's heads ({heads_k})")
  if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral) or head_dim_v < 1:
    raise ValueError(f"head_dim_v must be a positive int, got {head_dim_v!r}")
  if head_dim_v > dim_qk:
    raise ValueError(f"head_dim_v={head_dim_v} must not exceed dim_qk={dim_qk}: V is the first head_dim_v "
                     "columns of the K cache")
  if is_fp8_kvcache and head_dim_v > D_NOPE:
    raise ValueError(f"head_dim_v={head_dim_v} must be at most {D_NOPE} with an FP8 cache (V is the NoPE part)")
  if block_table.ndim != 2 or block_table.shape[0] != batch:
    raise ValueError(f"block_table must be [batch={batch}, max_blocks], got shape {block_table.shape}")
  _int32("block_table", block_table, tuple(block_table.shape), "pages of each request")
  _int32("cache_seqlens", cache_seqlens, (batch,), "one length per request, matching q's batch")
  if metadata.ndim != 2 or metadata.shape[1] != METADATA_SIZE or metadata.shape[0] < 1:
    raise ValueError(f"tile_scheduler_metadata must be [num_sm_parts, {METADATA_SIZE}] from get_mla_metadata, "
                     f"got shape {metadata.shape}")
  _int32("tile_scheduler_metadata", metadata, tuple(metadata.shape), "from get_mla_metadata")
  _int32("num_splits", num_splits, (batch + 1,), "from get_mla_metadata, batch + 1 entries")
  if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
    raise ValueError(f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__}")
  if batch == 0 or seq_q == 0 or heads_q == 0:
    raise ValueError(f"q must have a non-empty batch, seq_q and heads, got shape {q.shape}")
  if num_blocks == 0 or block_table.shape[1] == 0:
    raise ValueError(f"k_cache needs at least one page and block_table at least one column, got "
                     f"k_cache {k_cache.shape} and block_table {block_table.shape}")
  if not isinstance(cache_seqlens, jax.core.Tracer):
    lengths = np.asarray(cache_seqlens)
    capacity = block_table.shape[1] * PAGE_SIZE
    if (lengths < 0).any() or (lengths > capacity).any():
      r = int(np.argmax((lengths < 0) | (lengths > capacity)))
      raise ValueError(f"cache_seqlens[{r}]={lengths[r]} must be in [0, {capacity}] "
                       f"(block_table has {block_table.shape[1]} pages of {PAGE_SIZE})")
  args = DecodeArgs(q, k_cache, block_table, cache_seqlens, metadata, num_splits)
  return args, DecodeDims(batch, seq_q, heads_q, heads_k, dim_qk, int(head_dim_v), block_table.shape[1],
                          metadata.shape[0])
