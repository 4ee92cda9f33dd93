"""`flash_mla_with_kvcache`: MLA decoding over a paged latent cache, FlashMLA's API, with `implementation=`.

`"xla"` is the scheduled split-KV algorithm in jnp (`mla.splitkv`); it runs everywhere.
`"mosaic_gpu"` is the Hopper kernel (`mla.mosaic_gpu`), sm90 only, or anywhere with
`interpret=True` (Mosaic GPU interpret mode: its exact code, slowly). `None` tries the platform's preferred backends in order and falls through on
`NotImplementedError`; an unknown name raises ValueError. Arguments are checked once, here,
and the metadata's coverage of the lengths is checked here for every backend.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from backends import select_and_run
from mla import metadata, mosaic_gpu, splitkv, validation

# Backends, and where each runs natively; INTERPRETABLE ones also run anywhere with interpret=True.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {"xla": splitkv.flash_mla_splitkv,
                                                  "mosaic_gpu": mosaic_gpu.flash_mla_mosaic_gpu}
PLATFORMS: dict[str, tuple[str, ...]] = {"xla": ("cpu", "gpu", "tpu"), "mosaic_gpu": ("gpu",)}
INTERPRETABLE = frozenset({"mosaic_gpu"})
_PREFERRED = {"gpu": ("mosaic_gpu", "xla")}


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int, tile_scheduler_metadata,
                           num_splits, *, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, implementation: str | None = None,
                           interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Decode attention of each request's queries over its paged latent KV cache.

  MQA/GQA: query head h uses KV head `h // (heads_q // heads_k)`. V is the first `head_dim_v`
  columns of the K cache (MLA's latent); there is no second cache.

  Args:
    q: `[batch, seq_q, heads_q, dim_qk]` bfloat16 or float16; dim_qk is usually 576 (512
      latent + 64 RoPE), and seq_q > 1 is multi-token (MTP) decoding.
    k_cache: `[num_blocks, 64, heads_k, dim_qk]` in q's dtype; with `is_fp8_kvcache`,
      `[num_blocks, 64, heads_k, 656]` uint8 from `mla.quantize_kv_cache`.
    block_table: `[batch, max_blocks]` int32, each request's pages in order. Entries past a
      request's length are never read (FlashMLA's tests fill them with 2147480000).
    cache_seqlens: `[batch]` int32, cached tokens per request (0 allowed).
    head_dim_v: V's width, usually 512; at most dim_qk.
    tile_scheduler_metadata: `[num_sm_parts, 8]` int32 from `get_mla_metadata`, for these
      `cache_seqlens` and head counts.
    num_splits: `[batch + 1]` int32 from `get_mla_metadata`.
    softmax_scale: defaults to `dim_qk ** -0.5`.
    causal: with seq_q > 1, query i of a request of length L sees keys `< L - seq_q + i + 1`.
    is_fp8_kvcache: decode from the 656-byte FP8 cache.
    implementation: a backend name, or None for the platform's best.
    interpret: run a kernel backend in Mosaic GPU interpret mode (any platform).

  Returns:
    `(out [batch, seq_q, heads_q, head_dim_v] q.dtype, lse [batch, heads_q, seq_q] float32)`,
    lse in natural log. A query with no visible key (length 0, or causal past the start) gets
    out = 0 and lse = +inf. Metadata that does not match the lengths gives NaN for the requests
    it misses.
  """
  args, dims = validation.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                            tile_scheduler_metadata, num_splits, softmax_scale, is_fp8_kvcache)
  scale = float(dims.dim_qk ** -0.5 if softmax_scale is None else softmax_scale)
  kwargs = dict(head_dim_v=dims.dim_v, softmax_scale=scale, causal=bool(causal) and dims.seq_q > 1,
                is_fp8_kvcache=bool(is_fp8_kvcache), interpret=bool(interpret))
  out, lse = _run(implementation, args, kwargs)
  # Every backend trusts the metadata; a request it does not cover exactly once is NaN, not wrong.
  stale = metadata.uncovered_requests(args.tile_scheduler_metadata, args.num_splits, args.cache_seqlens,
                                      dims.max_blocks)
  return (jnp.where(stale[:, None, None, None], jnp.nan, out).astype(out.dtype),
          jnp.where(stale[:, None, None], jnp.nan, lse))


def _run(implementation, args, kwargs):
  return select_and_run("flash_mla_with_kvcache", IMPLEMENTATIONS, implementation, _PREFERRED, *args, **kwargs)
