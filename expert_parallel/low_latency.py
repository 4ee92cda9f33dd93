"""DeepEP's low-latency mode for `jax.shard_map`: per-expert masked receive buffers, for decode.

A rank sends each token once to each rank holding one of its experts, FP8-quantized by default
(quantized once per token), and receives into
`[E_local, M * R, H]` (M = num_max_dispatch_tokens_per_rank): for local expert e, the first
`recv_count[e]` rows are valid, in (source rank, source token) order. That is the masked
layout `fp8.m_grouped_gemm_nt_masked` takes directly. The combine sends the expert outputs
back and reduces them weighted by `topk_weights`, as DeepEP's does.

One implementation, every shape static: a source sends each token once to each rank that holds
one of its experts (`[R, M, H]` blocks, each token at its own row, through `lax.all_to_all`,
with the `[R, E_local, M]` expert masks), and the receiver gathers the masked per-expert rows
from them. The combine reduces on the expert side first: each rank weighs and sums its
experts' outputs per token (the weights travel there, `[R, M, E_local]`), sends one float32 row
per (token, rank) back, and the source sums over ranks. So the wire carries at most R * M rows
each way, padded, not E * M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import fp8
from expert_parallel import validation
from expert_parallel.types import LowLatencyHandle


def _selection(topk_idx: jax.Array, num_experts: int) -> jax.Array:
  """`[M, K]` global ids -> `[E, M]` bool: token t chose expert g (each pair once)."""
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  return (topk_idx[None, :, :] == experts[:, None, None]).any(axis=2)


def low_latency_dispatch(x, topk_idx, *, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, axis_name="ep"):
  """Sends each token to its experts' ranks, into a masked per-expert layout (a row per (token, expert)).

  Args:
    x: `[T, H]` bfloat16 (or float32), this rank's tokens; T <= num_max_dispatch_tokens_per_rank.
    topk_idx: `[T, K]` int32 global expert ids, -1 = none.
    num_max_dispatch_tokens_per_rank: M, the most tokens any rank dispatches (static).
    num_experts: E, a multiple of the axis size R.
    use_fp8: quantize per token (1 x 128 tiles, `fp8.quantize_per_token`) before sending; H
      must then be a multiple of 128.
    axis_name: the mesh axis the experts are sharded over.

  Returns:
    `(recv_x, recv_count, handle)`: recv_x is `[E_local, R * M, H]` in x's dtype, or with
    use_fp8 the pair `(float8_e4m3fn [E_local, R * M, H], scales [E_local, R * M, H / 128]
    float32)`; recv_count `[E_local]` int32 valid rows per local expert (zeros after them);
    handle a `LowLatencyHandle`.
  """
  num_ranks = validation.axis_size(axis_name)
  num_experts = validation.positive_int("num_experts", num_experts)
  max_tokens = validation.positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
  topk_idx = validation.check_topk(topk_idx, num_experts, num_ranks)
  data, scales = validation.check_x(x, topk_idx.shape[0])
  if scales is not None:
    raise ValueError("low_latency_dispatch quantizes x itself (use_fp8=True); pass bf16 or f32 x")
  tokens, hidden = data.shape
  if tokens > max_tokens:
    raise ValueError(f"x has {tokens} tokens, more than num_max_dispatch_tokens_per_rank={max_tokens}")
  if use_fp8 and hidden % fp8.formats.BLOCK:
    raise ValueError(f"x's hidden size {hidden} must be a multiple of {fp8.formats.BLOCK} with use_fp8=True")
  num_local = num_experts // num_ranks
  pad = max_tokens - tokens
  topk_idx = jnp.pad(topk_idx, ((0, pad), (0, 0)), constant_values=-1)
  data = jnp.pad(data, ((0, pad), (0, 0)))
  chosen = _selection(topk_idx, num_experts).reshape(num_ranks, num_local, max_tokens)
  received_mask = lax.all_to_all(chosen, axis_name, 0, 0, tiled=True)  # [source, e, t]

  mask = received_mask.transpose(1, 0, 2).reshape(num_local, num_ranks * max_tokens)  # [e, source * M + t]
  recv_count = mask.sum(axis=1, dtype=jnp.int32)
  order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)  # valid (source, token) first, in order
  src_info = jnp.where(jnp.arange(num_ranks * max_tokens)[None, :] < recv_count[:, None], order, -1)
  to_rank = chosen.any(axis=1)  # [R, M]: token t goes to rank r once, whatever its experts there

  def move(values):  # [M, W] -> received [E_local, R * M, W], compacted per expert
    blocks = jnp.where(to_rank[..., None], values[None], jnp.zeros((), values.dtype))
    received = lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # [source, t, W]
    rows = received.reshape(num_ranks * max_tokens, -1)[jnp.maximum(src_info, 0)]
    return jnp.where((src_info >= 0)[..., None], rows, jnp.zeros((), values.dtype))
  per_source = received_mask.sum(axis=2, dtype=jnp.int32).T  # [e, source]
  layout_range = jnp.stack([jnp.cumsum(per_source, axis=1, dtype=jnp.int32) - per_source, per_source], axis=-1)
  handle = LowLatencyHandle(src_info=src_info, recv_count=recv_count, layout_range=layout_range)
  if use_fp8:
    values, value_scales = fp8.quantize_per_token(data)
    return (move(values), move(value_scales)), recv_count, handle
  return move(data), recv_count, handle


def low_latency_combine(y, topk_idx, topk_weights, handle: LowLatencyHandle, *, axis_name="ep") -> jax.Array:
  """Sends expert outputs back and sums each token's, weighted by its top-k weights.

  Args:
    y: `[E_local, R * M, H]` bfloat16 or float32, row i of expert e the output for the row
      `low_latency_dispatch` put there (rows past recv_count are ignored).
    topk_idx: `[T, K]` int32, the same global ids that were dispatched.
    topk_weights: `[T, K]` floating.
    handle: that dispatch's `LowLatencyHandle`.
    axis_name: the mesh axis.

  Returns:
    `[T, H]` in y's dtype: `sum_k topk_weights[t, k] * y[expert k of t, row of t]`, in float32.
  """
  num_ranks = validation.axis_size(axis_name)
  y = validation.array("y", y)
  num_local, rows = handle.src_info.shape
  max_tokens = rows // num_ranks
  if y.ndim != 3 or y.shape[:2] != (num_local, rows) or y.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"y must be bfloat16 or float32 [{num_local}, {rows}, H], got {y.dtype} {y.shape}")
  topk_idx = validation.check_topk(topk_idx, num_local * num_ranks, num_ranks)
  topk_weights = validation.check_weights(topk_weights, topk_idx.shape)
  tokens, hidden = topk_idx.shape[0], y.shape[2]
  if tokens > max_tokens:
    raise ValueError(f"topk_idx has {tokens} tokens, more than the dispatch's {max_tokens}")
  # The weights go to the experts' ranks: [destination rank, t, local expert].
  padded_idx = jnp.pad(topk_idx, ((0, max_tokens - tokens), (0, 0)), constant_values=-1)
  padded_w = jnp.pad(topk_weights.astype(jnp.float32), ((0, max_tokens - tokens), (0, 0)))
  experts = jnp.arange(num_ranks * num_local, dtype=jnp.int32)
  per_expert = jnp.einsum("tk,tke->et", padded_w, (padded_idx[:, :, None] == experts).astype(jnp.float32))
  weights = lax.all_to_all(per_expert.reshape(num_ranks, num_local, max_tokens), axis_name, 0, 0, tiled=True)
  weights = weights.transpose(1, 0, 2).reshape(num_local, rows)  # [e, source * M + t]
  # Row i of expert e answers slot src_info[e, i]; find it from the slot's side, then weigh and sum.
  slot_row = jnp.full((num_local, rows + 1), -1, jnp.int32).at[
      jnp.arange(num_local)[:, None], jnp.where(handle.src_info >= 0, handle.src_info, rows)].set(
          jnp.arange(rows, dtype=jnp.int32)[None, :], mode="drop")[:, :rows]
  picked = jnp.take_along_axis(y, jnp.maximum(slot_row, 0)[..., None], axis=1).astype(jnp.float32)
  picked = jnp.where((slot_row >= 0)[..., None], picked, 0.0)  # rows past recv_count may hold anything
  partial = jnp.einsum("es,esh->sh", weights, picked)  # [source * M + t, H] float32
  back = lax.all_to_all(partial.reshape(num_ranks, max_tokens, hidden), axis_name, 0, 0, tiled=True)
  return back.sum(axis=0)[:tokens].astype(y.dtype)  # this rank's tokens, summed over the experts' ranks
