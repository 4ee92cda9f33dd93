"""The routed experts' SwiGLU on one rank: `sum_k w_k * down(silu(gate(x)) * up(x))` per row.

Two paths over the same (row, expert) pairs, sorted by expert:
- float (bf16/f32, differentiable): `lax.ragged_dot` over the sorted pairs;
- FP8 (inference): DeepGEMM's contiguous layout, each expert's rows padded to 128, through
  `fp8.m_grouped_gemm_nt_contiguous` (gate and up fused into one GEMM), activations quantized
  per token and weights per 128x128 block.
Plus the masked path for low-latency decode (`fp8.m_grouped_gemm_nt_masked`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import fp8


def _pairs(local_idx: jax.Array, num_groups: int):
  """`[N, K]` local expert ids (-1 none) -> pairs sorted by expert: (order, group_sizes, rank in group)."""
  flat = local_idx.reshape(-1)
  key = jnp.where(flat >= 0, flat, num_groups)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros(num_groups + 1, jnp.int32).at[key].add(1)[:num_groups]
  return order, group_sizes, key[order]


def swiglu(gate_up: jax.Array) -> jax.Array:
  """`[..., 2I]` (gate then up) -> `[..., I]` silu(gate) * up, in float32."""
  gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
  return jax.nn.silu(gate) * up


def routed_ffn(rows, local_idx, weights, w_gate, w_up, w_down, *, use_fp8: bool = False):
  """Each row's weighted sum over its local experts.

  Args:
    rows: `[N, H]` float (bf16/f32), or with use_fp8 the pair `(float8_e4m3fn [N, H], scales
      [N, H / 128])`.
    local_idx: `[N, K]` int32 local expert ids in [0, G), -1 = none.
    weights: `[N, K]` float routing weights.
    w_gate, w_up: `[G, I, H]`; w_down: `[G, H, I]`: float (quantized per call with use_fp8), or
      already block-quantized pairs `(float8_e4m3fn, float32 [G, ., .] 128x128 scales)` (used
      as stored with use_fp8, dequantized to the rows' dtype without).
    use_fp8: the contiguous-layout FP8 GEMMs instead of `ragged_dot`.

  Returns:
    `[N, H]` float32.
  """
  num_groups = _data(w_gate).shape[0]
  num_rows, topk = local_idx.shape
  order, group_sizes, sorted_group = _pairs(local_idx, num_groups)
  pair_row = order // topk
  valid = sorted_group < num_groups
  pair_weight = jnp.where(valid, weights.reshape(-1)[order].astype(jnp.float32), 0.0)
  if use_fp8:
    out = _contiguous_fp8(rows, pair_row, sorted_group, group_sizes, w_gate, w_up, w_down)
  else:
    x = rows[pair_row]
    w_gate, w_up, w_down = (fp8.dense(w, x.dtype) for w in (w_gate, w_up, w_down))
    gate_up = jnp.concatenate([w_gate, w_up], axis=1)  # [G, 2I, H]
    hidden = jax.lax.ragged_dot(x, gate_up.transpose(0, 2, 1).astype(x.dtype), group_sizes,
                                preferred_element_type=jnp.float32)
    act = swiglu(hidden).astype(x.dtype)
    out = jax.lax.ragged_dot(act, w_down.transpose(0, 2, 1).astype(x.dtype), group_sizes,
                             preferred_element_type=jnp.float32)
  out = jnp.where(valid[:, None], out * pair_weight[:, None], 0.0)
  return jnp.zeros((num_rows, out.shape[1]), jnp.float32).at[pair_row].add(out)


def _contiguous_fp8(rows, pair_row, sorted_group, group_sizes, w_gate, w_up, w_down):
  """Sorted pairs -> DeepGEMM's contiguous layout -> two FP8 grouped GEMMs -> `[P, H]` float32 per pair."""
  data, scales = rows
  num_groups = _data(w_gate).shape[0]
  pairs = pair_row.shape[0]
  align = fp8.get_m_alignment_for_contiguous_layout()
  m_sum = -(-(pairs + num_groups * (align - 1)) // align) * align  # room for every group's padding
  m_indices, starts = fp8.contiguous_m_indices(group_sizes, m_sum)
  first_of_group = jnp.searchsorted(sorted_group, sorted_group, side="left")
  position = jnp.where(sorted_group < num_groups,
                       starts[jnp.minimum(sorted_group, num_groups - 1)] + jnp.arange(pairs) - first_of_group, m_sum)
  a = jnp.zeros((m_sum, data.shape[1]), data.dtype).at[position].set(data[pair_row], mode="drop")
  sa = jnp.zeros((m_sum, scales.shape[1]), scales.dtype).at[position].set(scales[pair_row], mode="drop")
  hidden = fp8.m_grouped_gemm_nt_contiguous((a, sa), _gate_up(w_gate, w_up), m_indices, out_dtype=jnp.float32)
  act = fp8.quantize_per_token(swiglu(hidden))
  out = fp8.m_grouped_gemm_nt_contiguous(act, fp8.block_quantized(w_down), m_indices, out_dtype=jnp.float32)
  return out[jnp.minimum(position, m_sum - 1)]


def masked_ffn(recv, recv_count, w_gate, w_up, w_down, *, expected_m: int) -> jax.Array:
  """Low-latency experts: `[G, M', H]` FP8 rows (first recv_count[g] valid) -> `[G, M', H]` bfloat16.

  Weights as `routed_ffn`'s: float (quantized per call) or block-quantized pairs (used as stored).
  """
  hidden = fp8.m_grouped_gemm_nt_masked(recv, _gate_up(w_gate, w_up), recv_count, expected_m, out_dtype=jnp.float32)
  act = fp8.quantize_per_token(swiglu(hidden))
  return fp8.m_grouped_gemm_nt_masked(act, fp8.block_quantized(w_down), recv_count, expected_m,
                                      out_dtype=jnp.bfloat16)


def fp8_fits(hidden_size: int, moe_intermediate_size: int) -> bool:
  """Whether the FP8 expert GEMMs take these sizes (both multiples of 128, DeepGEMM's k block)."""
  return hidden_size % fp8.formats.BLOCK == 0 and moe_intermediate_size % fp8.formats.BLOCK == 0


def _data(w):
  return w[0] if isinstance(w, (tuple, list)) else w


def _gate_up(w_gate, w_up):
  """gate and up fused along the output axis `[G, 2I, H]`, block-quantized (pairs concatenated as stored)."""
  if not isinstance(w_gate, (tuple, list)):
    return fp8.quantize_per_block(jnp.concatenate([w_gate, w_up], axis=1))
  if w_gate[0].shape[1] % fp8.formats.BLOCK:
    raise ValueError(f"stored FP8 experts need moe_intermediate_size divisible by {fp8.formats.BLOCK} to fuse gate "
                     f"and up, got {w_gate[0].shape[1]}")
  return tuple(jnp.concatenate([g, u], axis=1) for g, u in zip(w_gate, w_up))
