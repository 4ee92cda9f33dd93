"""DeepEP's normal (high-throughput) mode for `jax.shard_map`: `dispatch` and `combine`.

Every shape is static: a rank receives into `capacity` rows (default `T * R`, which never
drops), valid rows first in DeepEP's order (by source rank, then source token), and reports
how many rows were valid and how many did not fit. Call both inside a `shard_map` over
`axis_name`; x, topk_idx and topk_weights are this rank's tokens.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from expert_parallel import routing, transport, validation
from expert_parallel.types import DispatchHandle, DispatchResult

IMPLEMENTATIONS = ("xla", "ffi", "ragged")
# "ragged" and the CUDA ffi kernels have not yet run on a GPU; until they have, None means xla.
_PREFERRED = {"cpu": ("xla",), "gpu": ("xla",)}


def _implementation(implementation: str | None) -> str:
  if implementation is None:
    return _PREFERRED.get(jax.default_backend(), ("xla",))[0]
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS} or None")
  if jax.default_backend() not in transport.PLATFORMS[implementation]:
    raise NotImplementedError(f"implementation={implementation!r} runs on {transport.PLATFORMS[implementation]}, "
                              f"not {jax.default_backend()} (XLA:CPU has no ragged_all_to_all)")
  return implementation


def dispatch(x, topk_idx, topk_weights, *, num_experts: int, axis_name="ep", capacity: int | None = None,
             expert_alignment: int = 1, implementation: str | None = None) -> tuple[DispatchResult, DispatchHandle]:
  """Sends each token to every rank that holds one of its experts.

  Args:
    x: this rank's tokens: `[T, H]` bfloat16 (or float32/float16), or the FP8 pair
      `(x_fp8 [T, H] float8_e4m3fn, scales [T, ceil(H / 128)] float32)` from
      `fp8.quantize_per_token`; the scales travel with the data.
    topk_idx: `[T, K]` int32 global expert ids, -1 = none. Expert e lives on rank
      `e // (num_experts // R)`.
    topk_weights: `[T, K]` floating routing weights.
    num_experts: E, a multiple of the axis size R.
    axis_name: the mesh axis the experts are sharded over.
    capacity: rows this rank receives into; default `T * R` (dropless). Rows past it, in
      (source rank, source token) order, are dropped and counted in `num_dropped`.
    expert_alignment: round each local expert's row count up to a multiple of this.
    implementation: "xla", "ffi", "ragged" (GPU), or None.

  Returns:
    `(DispatchResult, DispatchHandle)`. x (and topk_weights, bf16/f32) are differentiable: the
    backward is a combine of the cotangents.
  """
  num_ranks = validation.axis_size(axis_name)
  num_experts = validation.positive_int("num_experts", num_experts)
  expert_alignment = validation.positive_int("expert_alignment", expert_alignment)
  topk_idx = validation.check_topk(topk_idx, num_experts, num_ranks)
  tokens = topk_idx.shape[0]
  data, scales = validation.check_x(x, tokens)
  topk_weights = validation.check_weights(topk_weights, topk_idx.shape)
  capacity = tokens * num_ranks if capacity is None else capacity
  if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
    raise ValueError(f"capacity must be a positive int (rows this rank receives), got {capacity!r}")
  capacity = int(capacity)
  if num_ranks * max(tokens, capacity) >= 2**31:
    raise ValueError(f"capacity={capacity} rows overflow int32 row indices")
  implementation = _implementation(implementation)
  handle, wanted = routing.plan_dispatch(topk_idx, num_experts=num_experts, num_ranks=num_ranks, capacity=capacity,
                                         axis_name=axis_name,
                                         layout_implementation="ffi" if implementation == "ffi" else "xla")
  move = lambda values: transport.send(values, handle, axis_name, implementation)
  move_raw = lambda values: transport.send_raw(values, handle, axis_name=axis_name, implementation=implementation)
  recv_x = move(data) if scales is None else move_raw(data)
  recv_scales = None if scales is None else move_raw(scales)
  me = lax.axis_index(axis_name)
  num_local = num_experts // num_ranks
  recv_global = move_raw(jnp.where(topk_idx >= 0, topk_idx, -1))
  valid = handle.recv_slot >= 0
  recv_local = jnp.where(valid[:, None], routing.local_expert_ids(recv_global, num_local, me), -1)
  recv_weights = move(topk_weights)
  recv_weights = jnp.where(recv_local >= 0, recv_weights, jnp.zeros((), recv_weights.dtype))
  # Source rank and token of each row travel as values, so a test can check the routing exactly.
  source_token = move_raw(jnp.arange(tokens, dtype=jnp.int32))
  src_rank = jnp.where(valid, jnp.searchsorted(handle.recv_prefix + handle.recv_counts,
                                                jnp.arange(capacity), side="right"), -1).astype(jnp.int32)
  counts = jnp.zeros(num_local, jnp.int32).at[jnp.where(recv_local >= 0, recv_local, num_local).reshape(-1)].add(
      1, mode="drop")
  num_valid = handle.recv_counts.sum()
  result = DispatchResult(
      x=recv_x, x_scales=recv_scales, topk_idx=recv_local, topk_weights=recv_weights, src_rank=src_rank,
      src_token=jnp.where(valid, source_token, -1),
      num_tokens_per_expert=-(-counts // expert_alignment) * expert_alignment,
      num_valid=num_valid, num_dropped=wanted.sum() - num_valid)
  return result, handle


def combine(y, handle: DispatchHandle, *, topk_weights=None, axis_name="ep",
            implementation: str | None = None) -> jax.Array:
  """Sends received rows back to their source ranks and sums each token's copies.

  Args:
    y: `[capacity, H]` float32 or bfloat16, one row per received row (rows past `num_valid`
      are ignored), e.g. each row's experts' outputs already weighted and summed.
    handle: the `DispatchHandle` of the dispatch that produced the rows.
    topk_weights: None for DeepEP's unweighted sum; or `[capacity, K]` floating weights (the
      dispatch result's `topk_weights`), which scale each row by the sum of its weights here.
      That is sum_k w_k * y_k only when a row's output is the same for all its local experts;
      an MoE weighs each expert's output itself and combines unweighted.
    axis_name: as in dispatch.
    implementation: as in dispatch (need not match it).

  Returns:
    `[T, H]` in y's dtype, summed in float32; zeros for tokens that went nowhere. Differentiable
    in y and topk_weights; the backward of y is a dispatch reusing the handle.
  """
  validation.axis_size(axis_name)
  y = validation.array("y", y)
  capacity = handle.recv_slot.shape[0]
  if y.ndim != 2 or y.shape[0] != capacity or y.dtype not in validation.X_DTYPES:
    raise ValueError(f"y must be bfloat16, float32 or float16 [capacity={capacity}, H], got {y.dtype} {y.shape}")
  implementation = _implementation(implementation)
  valid = handle.recv_slot >= 0
  y = jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))  # first: rows past num_valid may hold anything
  if topk_weights is not None:
    topk_weights = validation.check_weights(topk_weights, (capacity, topk_weights.shape[-1]))
    scale = jnp.where(valid, topk_weights.astype(jnp.float32).sum(axis=1), 0.0)
    y = (y.astype(jnp.float32) * scale[:, None]).astype(y.dtype)
  return transport.send_back(y, handle, axis_name, implementation)
