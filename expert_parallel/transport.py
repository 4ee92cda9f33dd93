"""Moving rows along a dispatch plan and back, in three implementations with identical results.

`send(values, handle)` takes `[T, ...]` source rows to `[capacity, ...]` received rows;
`send_back(rows, handle)` takes `[capacity, ...]` rows back and sums each token's copies into
`[T, ...]`. Each is linear and the other's transpose, which is how their custom VJPs are
written: the backward of a dispatch is a combine, and the backward of a combine is a dispatch
that reuses the handle.

- `"xla"`: pack `[R, C, ...]` per destination (C = min(T, capacity) rows), a capacity-padded
  `lax.all_to_all`, then gather each source's first rows into place. Runs everywhere.
- `"ffi"`: the same, with ffi's C++/CUDA pack and unpack kernels for `[T, H]` float rows.
- `"ragged"`: `lax.ragged_all_to_all` straight into place (no padding on the wire); XLA:CPU
  does not implement it, so it runs on GPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import ffi
from expert_parallel.routing import per_rank
from expert_parallel.types import DispatchHandle

PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "ffi": ("cpu", "gpu"), "ragged": ("gpu", "tpu")}


def _trailing(mask: jax.Array, values: jax.Array) -> jax.Array:
  return mask.reshape(*mask.shape, *([1] * (values.ndim - mask.ndim)))


def _uses_ffi(implementation: str, values: jax.Array) -> bool:
  return implementation == "ffi" and values.ndim == 2 and values.dtype in (jnp.float32, jnp.bfloat16)


def _pack(values, handle: DispatchHandle, implementation: str):
  """`[T, ...]` -> `[R, C, ...]`: each destination's rows in source order, zeros after."""
  src = handle.send_src_idx
  num_ranks, per_source = src.shape
  if _uses_ffi(implementation, values):
    # One "expert" per rank: ffi packs by destination rank, in the same first-come order.
    packed = ffi.dispatch_pack(values, handle.topk_rank, num_experts=num_ranks, num_ranks=num_ranks,
                               capacity=per_source, implementation="ffi").buffer
    return jnp.where(_trailing(src >= 0, packed), packed, jnp.zeros((), values.dtype))
  if values.shape[0] == 0:
    return jnp.zeros((num_ranks, per_source, *values.shape[1:]), values.dtype)
  gathered = values[jnp.maximum(src, 0)]
  return jnp.where(_trailing(src >= 0, gathered), gathered, jnp.zeros((), values.dtype))


def _unpack(rows, handle: DispatchHandle, num_tokens: int, implementation: str):
  """`[R, C, ...]` rows returned per destination -> `[T, ...]`, each token's copies summed (f32 for floats)."""
  src = handle.send_src_idx
  if implementation == "ffi" and rows.ndim == 3 and rows.dtype in (jnp.float32, jnp.bfloat16):
    return ffi.combine_unpack(rows, src, num_tokens=num_tokens, implementation="ffi")
  target = jnp.where(src >= 0, src, num_tokens).reshape(-1)
  flat = rows.reshape(-1, *rows.shape[2:])
  accumulate = jnp.float32 if jnp.issubdtype(rows.dtype, jnp.floating) else rows.dtype
  out = jnp.zeros((num_tokens, *rows.shape[2:]), accumulate).at[target].add(flat.astype(accumulate), mode="drop")
  return out.astype(rows.dtype)


def _place(received, handle: DispatchHandle):
  """`[R, C, ...]` blocks per source -> `[capacity, ...]` rows in (source, token) order, zeros after."""
  flat = received.reshape(-1, *received.shape[2:])
  slot = handle.recv_slot
  if flat.shape[0] == 0:
    return jnp.zeros((slot.shape[0], *flat.shape[1:]), flat.dtype)
  gathered = flat[jnp.maximum(slot, 0)]
  return jnp.where(_trailing(slot >= 0, gathered), gathered, jnp.zeros((), flat.dtype))


def _blocks(rows, handle: DispatchHandle):
  """`[capacity, ...]` -> `[R, C, ...]`: each source's rows back in its block, zeros after."""
  per_source = handle.send_src_idx.shape[1]
  p = jnp.arange(per_source, dtype=jnp.int32)[None, :]
  index = handle.recv_prefix[:, None] + p
  valid = p < handle.recv_counts[:, None]
  if rows.shape[0] == 0:
    return jnp.zeros((*valid.shape, *rows.shape[1:]), rows.dtype)
  gathered = rows[jnp.where(valid, index, 0)]
  return jnp.where(_trailing(valid, gathered), gathered, jnp.zeros((), rows.dtype))


def send_raw(values, handle: DispatchHandle, *, axis_name, implementation: str):
  """`[T, ...]` -> `[capacity, ...]`, without a custom VJP (integer rows, or inside the VJPs)."""
  capacity = handle.recv_slot.shape[0]
  if implementation == "ragged":
    num_ranks, per_source = handle.send_src_idx.shape
    operand = _pack(values, handle, implementation).reshape(num_ranks * per_source, *values.shape[1:])
    output = jnp.zeros((capacity, *values.shape[1:]), values.dtype)
    return per_rank(lax.ragged_all_to_all(operand, output, jnp.arange(num_ranks, dtype=jnp.int32) * per_source,
                                          handle.send_counts, handle.send_offsets, handle.recv_counts,
                                          axis_name=axis_name), axis_name)
  packed = per_rank(_pack(values, handle, implementation), axis_name)
  received = lax.all_to_all(packed, axis_name, 0, 0, tiled=True)
  return per_rank(_place(received, handle), axis_name)


def send_back_raw(rows, handle: DispatchHandle, *, axis_name, implementation: str):
  """`[capacity, ...]` -> `[T, ...]`, each token's copies summed; without a custom VJP."""
  num_tokens = handle.topk_rank.shape[0]
  num_ranks, per_source = handle.send_src_idx.shape
  if implementation == "ragged":
    me = lax.axis_index(axis_name)
    output = jnp.zeros((num_ranks * per_source, *rows.shape[1:]), rows.dtype)
    back = lax.ragged_all_to_all(rows, output, handle.recv_prefix, handle.recv_counts,
                                 jnp.full((num_ranks,), me * per_source, jnp.int32), handle.send_counts,
                                 axis_name=axis_name)
    back = back.reshape(num_ranks, per_source, *rows.shape[1:])
  else:
    back = lax.all_to_all(_blocks(rows, handle), axis_name, 0, 0, tiled=True)
  return per_rank(_unpack(back, handle, num_tokens, implementation), axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def send(values, handle: DispatchHandle, axis_name, implementation: str):
  """Differentiable `send_raw`: its backward is `send_back` of the cotangent."""
  return send_raw(values, handle, axis_name=axis_name, implementation=implementation)


def _send_fwd(values, handle, axis_name, implementation):
  return send(values, handle, axis_name, implementation), handle


def _send_bwd(axis_name, implementation, handle, cotangent):
  grad = send_back_raw(cotangent, handle, axis_name=axis_name, implementation=implementation)
  return grad, None


send.defvjp(_send_fwd, _send_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def send_back(rows, handle: DispatchHandle, axis_name, implementation: str):
  """Differentiable `send_back_raw`: its backward is a `send` that reuses the handle."""
  return send_back_raw(rows, handle, axis_name=axis_name, implementation=implementation)


def _send_back_fwd(rows, handle, axis_name, implementation):
  return send_back(rows, handle, axis_name, implementation), handle


def _send_back_bwd(axis_name, implementation, handle, cotangent):
  return send_raw(cotangent, handle, axis_name=axis_name, implementation=implementation), None


send_back.defvjp(_send_back_fwd, _send_back_bwd)
