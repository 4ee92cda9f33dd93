"""The local compute of an expert-parallel dispatch and combine, with `implementation=`.

`dispatch_layout` is DeepEP's `get_dispatch_layout`; `dispatch_pack` builds the rank-major send
buffer that a collective (all_to_all, or ragged_all_to_all with `offsets` and `counts`) moves;
`combine_unpack` sums what came back into each source token. Backends: `"xla"` (jnp,
`ffi.reference`) and `"ffi"` (the C++ CPU and CUDA handlers under `ffi/csrc/`, built on first
use). `None` picks per op and platform what measured faster (falling back to `"xla"` when
there is no compiler), and `"xla"` on GPU until the CUDA handlers have been checked on one. Every op is jittable and runs per device under `jax.shard_map`; under vmap the FFI
calls run sequentially (`vmap_method="sequential"`).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from backends import select_and_run
from ffi import reference, targets


class DispatchLayout(NamedTuple):
  num_tokens_per_rank: jax.Array  # [R] int32
  num_tokens_per_expert: jax.Array  # [E] int32
  is_token_in_rank: jax.Array  # [T, R] bool


class PackedTokens(NamedTuple):
  buffer: jax.Array  # [R, capacity, H], x's dtype; rank r's rows first-come in source order, zeros after
  counts: jax.Array  # [R] int32, rows written per rank
  offsets: jax.Array  # [R] int32, r * capacity: row offsets into the flattened buffer
  src_idx: jax.Array  # [R, capacity] int32, source token of each row, -1 for unused rows
  num_dropped: jax.Array  # [R] int32, tokens that did not fit in a rank's capacity


def _ffi_layout(topk_idx, *, num_experts, num_ranks):
  _require_ffi_platform()
  targets.ensure_registered_for_backend()
  tokens = topk_idx.shape[0]
  call = jax.ffi.ffi_call("fireflyer_dispatch_layout",
                          (jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
                           jax.ShapeDtypeStruct((num_experts,), jnp.int32),
                           jax.ShapeDtypeStruct((tokens, num_ranks), jnp.bool_)),
                          vmap_method="sequential")
  return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


def _ffi_pack(x, topk_idx, *, num_experts, num_ranks, capacity):
  _require_ffi_platform()
  targets.ensure_registered_for_backend()
  hidden = x.shape[1]
  call = jax.ffi.ffi_call("fireflyer_dispatch_pack",
                          (jax.ShapeDtypeStruct((num_ranks, capacity, hidden), x.dtype),
                           *[jax.ShapeDtypeStruct((num_ranks,), jnp.int32)] * 2,
                           jax.ShapeDtypeStruct((num_ranks, capacity), jnp.int32),
                           jax.ShapeDtypeStruct((num_ranks,), jnp.int32)),
                          vmap_method="sequential")
  return call(x, topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks),
              capacity=np.int64(capacity))


def _ffi_combine(rows, src_idx, weights, *, num_tokens):
  _require_ffi_platform()
  targets.ensure_registered_for_backend()
  call = jax.ffi.ffi_call("fireflyer_combine_unpack",
                          (jax.ShapeDtypeStruct((num_tokens, rows.shape[-1]), rows.dtype),
                           jax.ShapeDtypeStruct((num_tokens, rows.shape[0]), jnp.int32)),  # working memory
                          vmap_method="sequential")
  out, _ = call(rows, src_idx, weights, num_tokens=np.int64(num_tokens))
  return out


def _require_ffi_platform() -> None:
  if jax.default_backend() not in PLATFORMS["ffi"]:
    raise NotImplementedError(f"the FFI handlers exist for {PLATFORMS['ffi']}, not {jax.default_backend()}")


IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "dispatch_layout": {"xla": reference.dispatch_layout, "ffi": _ffi_layout},
    "dispatch_pack": {"xla": reference.dispatch_pack, "ffi": _ffi_pack},
    "combine_unpack": {"xla": reference.combine_unpack, "ffi": _ffi_combine},
}
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "ffi": ("cpu", "gpu")}
# Per op and platform, from docs/performance.md (2 CPU cores, DeepSeek-V3's shape): the C++
# combine is 8x the reference; layout and pack are not faster there, so the reference stays.
# The CUDA handlers compile and lower in CI but have not yet run on a GPU: until they have, GPU
# callers get the reference unless they ask for "ffi".
_PREFERRED = {
    "dispatch_layout": {"cpu": ("xla",), "gpu": ("xla",)},
    "dispatch_pack": {"cpu": ("xla",), "gpu": ("xla",)},
    "combine_unpack": {"cpu": ("ffi", "xla"), "gpu": ("xla",)},
}


def _run(op: str, implementation: str | None, *args, **kwargs):
  return select_and_run(op, IMPLEMENTATIONS[op], implementation, _PREFERRED[op], *args, **kwargs)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def check_topk(topk_idx, num_experts: int, num_ranks: int) -> jax.Array:
  """`[T, K]` int32 expert ids in [-1, num_experts) (checked when concrete), experts split evenly over ranks."""
  topk_idx = topk_idx if isinstance(topk_idx, jax.Array) else jnp.asarray(topk_idx)
  if topk_idx.ndim != 2 or topk_idx.dtype != jnp.int32:
    raise ValueError(f"topk_idx must be int32 [num_tokens, num_topk], got {topk_idx.dtype} {topk_idx.shape}")
  if num_experts % num_ranks:
    raise ValueError(f"num_experts={num_experts} must be a multiple of num_ranks={num_ranks}")
  if not isinstance(topk_idx, jax.core.Tracer):
    values = np.asarray(topk_idx)
    bad = (values < -1) | (values >= num_experts)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"topk_idx{list(where)}={values[where]} is outside [-1, {num_experts})")
  return topk_idx


def dispatch_layout(topk_idx, *, num_experts: int, num_ranks: int,
                    implementation: str | None = None) -> DispatchLayout:
  """Where each token goes: DeepEP's `get_dispatch_layout`.

  Args:
    topk_idx: `[num_tokens, num_topk]` int32 expert ids, -1 = none. Expert e lives on rank
      `e // (num_experts // num_ranks)`.
    num_experts: E, a multiple of num_ranks.
    num_ranks: R.
    implementation: "xla", "ffi", or None.

  Returns:
    `DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
    is_token_in_rank [T, R] bool)`; a token counts once per rank however many of its experts
    live there, and once per (token, k) entry for the expert counts.
  """
  num_experts, num_ranks = _positive_int("num_experts", num_experts), _positive_int("num_ranks", num_ranks)
  topk_idx = check_topk(topk_idx, num_experts, num_ranks)
  return DispatchLayout(*_run("dispatch_layout", implementation, topk_idx, num_experts=num_experts,
                              num_ranks=num_ranks))


def dispatch_pack(x, topk_idx, *, num_experts: int, num_ranks: int, capacity: int | None = None,
                  implementation: str | None = None) -> PackedTokens:
  """Copies each token once per destination rank into a rank-major send buffer.

  Within a rank, rows keep source order. A rank receiving more than `capacity` tokens keeps the
  first `capacity` and counts the rest in `num_dropped`; the default capacity, num_tokens, never
  drops.

  Args:
    x: `[num_tokens, hidden]` any dtype (bf16 activations, or fp8 data).
    topk_idx: `[num_tokens, num_topk]` int32, -1 = none.
    num_experts: E, a multiple of num_ranks.
    num_ranks: R.
    capacity: rows per rank in the buffer.
    implementation: "xla", "ffi", or None.

  Returns:
    `PackedTokens(buffer [R, capacity, hidden], counts [R], offsets [R], src_idx [R, capacity],
    num_dropped [R])`.
  """
  num_experts, num_ranks = _positive_int("num_experts", num_experts), _positive_int("num_ranks", num_ranks)
  topk_idx = check_topk(topk_idx, num_experts, num_ranks)
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  if x.ndim != 2 or x.shape[0] != topk_idx.shape[0]:
    raise ValueError(f"x must be [num_tokens={topk_idx.shape[0]}, hidden], got shape {x.shape}")
  if jax.dtypes.itemsize_bits(x.dtype) < 8:
    raise ValueError(f"x's dtype {x.dtype} packs several values per byte; pack it as uint8 first")
  capacity = x.shape[0] if capacity is None else capacity
  if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 0:
    raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
  if num_ranks * capacity >= 2**31:
    raise ValueError(f"capacity={capacity} x num_ranks={num_ranks} rows overflow the int32 offsets")
  return PackedTokens(*_run("dispatch_pack", implementation, x, topk_idx, num_experts=num_experts,
                            num_ranks=num_ranks, capacity=int(capacity)))


def combine_unpack(rows, src_idx, *, num_tokens: int, weights=None, implementation: str | None = None) -> jax.Array:
  """Sums the rows that came back for each source token: the inverse of `dispatch_pack`.

  DeepEP's normal-mode combine is unweighted (the experts already applied the routing
  weights); pass `weights` to scale each row, e.g. by the token's summed top-k weight on that
  rank when the expert side did not.

  Args:
    rows: `[R, capacity, hidden]` float32 or bfloat16.
    src_idx: `[R, capacity]` int32 source token of each row, -1 for unused rows (from
      `dispatch_pack`); a token appears at most once per rank.
    num_tokens: T.
    weights: optional `[R, capacity]` float32 per-row weights.
    implementation: "xla", "ffi", or None.

  Returns:
    `[num_tokens, hidden]` in rows' dtype, accumulated in f32; zeros for tokens with no rows.
  """
  rows = rows if isinstance(rows, jax.Array) else jnp.asarray(rows)
  src_idx = src_idx if isinstance(src_idx, jax.Array) else jnp.asarray(src_idx)
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 0:
    raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
  if rows.ndim != 3 or rows.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"rows must be float32 or bfloat16 [R, capacity, hidden], got {rows.dtype} {rows.shape}")
  if src_idx.dtype != jnp.int32 or src_idx.shape != rows.shape[:2]:
    raise ValueError(f"src_idx must be int32 {rows.shape[:2]}, got {src_idx.dtype} {src_idx.shape}")
  if weights is None:
    weights = jnp.ones(rows.shape[:2], jnp.float32)
  weights = weights if isinstance(weights, jax.Array) else jnp.asarray(weights)
  if weights.dtype != jnp.float32 or weights.shape != rows.shape[:2]:
    raise ValueError(f"weights must be float32 {rows.shape[:2]}, got {weights.dtype} {weights.shape}")
  if not isinstance(src_idx, jax.core.Tracer):
    values = np.asarray(src_idx)
    if ((values < -1) | (values >= num_tokens)).any():
      raise ValueError(f"src_idx holds {int(values.max())} or {int(values.min())}, outside [-1, {num_tokens})")
    for r, row in enumerate(values):
      used = row[row >= 0]
      if len(np.unique(used)) != len(used):
        raise ValueError(f"src_idx[{r}] names a token twice; each token comes back at most once per rank")
  return _run("combine_unpack", implementation, rows, src_idx, weights, num_tokens=num_tokens)
