"""DeepSeek-V3's MoE layer: gate, shared experts, and routed experts sharded over `ep`.

`moe_forward` (training / prefill) uses normal-mode dispatch and combine; `moe_decode` uses the
low-latency masked layout. Both are pure functions of a params dict, to call inside
`jax.shard_map` with the routed experts' leading axis sharded over `axis_name` (the gate and
the shared experts replicated). With `axis_name=None`, `moe_forward` runs every expert locally:
the same layer on one device without EP. `MoE` is the Flax NNX module holding the params.

Params (E logical experts, P >= E physical slots, H hidden, I = moe_intermediate_size):
  gate [E, H], bias [E] (e_score_correction_bias, selection only),
  w_gate, w_up [P, I, H], w_down [P, H, I] (this rank's P / R slots under shard_map),
  shared_gate, shared_up [S * I, H], shared_down [H, S * I] (absent when S = 0).
Any weight may be stored in FP8, as a DeepSeek-V3 FP8 checkpoint holds it: float8_e4m3fn with
`{name}_scale_inv` float32 128x128 block scales (`[P, I/128, H/128]` for `w_gate`). The FP8
paths then use it as stored; float paths dequantize it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import balancer
import fp8
from expert_parallel import experts, gate, low_latency, normal


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  hidden_size: int
  moe_intermediate_size: int
  n_shared_experts: int
  gate: gate.GateConfig


class Placement(NamedTuple):
  """Redundant experts from `balancer.rebalance_experts` (one layer): tokens go to physical replicas."""
  log2phy: jax.Array  # [E, maxcnt] int32 physical slots of each logical expert, -1 padded
  logcnt: jax.Array  # [E] int32 replicas per expert


class MoEOutput(NamedTuple):
  out: jax.Array  # [T, H] in x's dtype
  expert_counts: jax.Array  # [E] int32 (token, expert) pairs per logical expert, over every rank
  num_dropped: jax.Array  # [] int32 rows the dispatch dropped (capacity), summed over every rank


SCALE_SUFFIX = "_scale_inv"


def weight(params: dict, name: str):
  """`params[name]`, or `(fp8 data, scales)` when it is stored in FP8 with `{name}_scale_inv`."""
  if name + SCALE_SUFFIX in params:
    return params[name], params[name + SCALE_SUFFIX]
  return params[name]


def _project(x, w):
  """`x @ w.T` for a float `[n, k]` weight, or through the FP8 GEMM for a stored FP8 one."""
  if isinstance(w, tuple):
    return fp8.matmul_quantized(x, w)
  return x @ w.T.astype(x.dtype)


def _shared(params, x):
  if "shared_gate" not in params:
    return jnp.zeros(x.shape, jnp.float32)
  hidden = jnp.concatenate([_project(x, weight(params, "shared_gate")), _project(x, weight(params, "shared_up"))],
                           axis=-1)
  return _project(experts.swiglu(hidden).astype(x.dtype), weight(params, "shared_down"))


def _route(params, x, config: MoEConfig, axis_name, placement: Placement | None):
  topk_idx, topk_weights, _ = gate.route(x, params["gate"], params.get("bias"), config.gate)
  counts = balancer.count_expert_tokens(topk_idx, config.gate.num_experts)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  if placement is not None:
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    topk_idx = balancer.select_replicas(topk_idx, placement.log2phy, placement.logcnt, offset=offset)
  return topk_idx, topk_weights, counts


def moe_forward(params, x, config: MoEConfig, *, axis_name=None, capacity: int | None = None,
                use_fp8: bool = False, placement: Placement | None = None,
                implementation: str | None = None) -> MoEOutput:
  """The MoE layer for training and prefill (normal-mode dispatch).

  Args:
    params: the dict above; under shard_map, this rank's slice of the routed experts.
    x: `[T, H]` bfloat16 or float32, this rank's tokens.
    config: the layer's sizes and routing.
    axis_name: the `ep` mesh axis, or None to run every expert here (no dispatch).
    capacity: rows each rank receives (dispatch's; default dropless).
    use_fp8: FP8 dispatch and FP8 grouped GEMMs (inference; not differentiable). Otherwise the
      experts run `ragged_dot` in x's dtype and gradients flow through dispatch and combine.
    placement: redundant experts; then the routed weights hold the physical slots.
    implementation: the dispatch implementation.

  Returns:
    `MoEOutput(out, expert_counts, num_dropped)`.
  """
  topk_idx, topk_weights, counts = _route(params, x, config, axis_name, placement)
  rows = fp8.quantize_per_token(x) if use_fp8 else x
  w = tuple(weight(params, name) for name in ("w_gate", "w_up", "w_down"))
  if axis_name is None:
    routed = experts.routed_ffn(rows, topk_idx, topk_weights, *w, use_fp8=use_fp8)
    dropped = jnp.zeros((), jnp.int32)
  else:
    num_slots = params["w_gate"].shape[0] * jax.lax.axis_size(axis_name)
    result, handle = normal.dispatch(rows, topk_idx, topk_weights, num_experts=num_slots, axis_name=axis_name,
                                     capacity=capacity, implementation=implementation)
    received = (result.x, result.x_scales) if use_fp8 else result.x
    y = experts.routed_ffn(received, result.topk_idx, result.topk_weights, *w, use_fp8=use_fp8)
    routed = normal.combine(y, handle, axis_name=axis_name, implementation=implementation)
    dropped = jax.lax.psum(result.num_dropped, axis_name)
  out = routed + _shared(params, x).astype(jnp.float32)
  return MoEOutput(out.astype(x.dtype), counts, dropped)


def moe_decode(params, x, config: MoEConfig, *, axis_name="ep", num_max_dispatch_tokens_per_rank: int,
               placement: Placement | None = None) -> MoEOutput:
  """The MoE layer for decode: low-latency FP8 dispatch, masked grouped GEMMs, weighted combine.

  Args: as `moe_forward`, plus `num_max_dispatch_tokens_per_rank` (M, static; T <= M).

  Returns:
    `MoEOutput(out, expert_counts, num_dropped=0)` (the masked layout never drops).
  """
  topk_idx, topk_weights, counts = _route(params, x, config, axis_name, placement)
  num_slots = params["w_gate"].shape[0] * jax.lax.axis_size(axis_name)
  recv, recv_count, handle = low_latency.low_latency_dispatch(
      x, topk_idx, num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, num_experts=num_slots,
      axis_name=axis_name)
  y = experts.masked_ffn(recv, recv_count, *(weight(params, name) for name in ("w_gate", "w_up", "w_down")),
                         expected_m=num_max_dispatch_tokens_per_rank)
  routed = low_latency.low_latency_combine(y, topk_idx, topk_weights, handle, axis_name=axis_name)
  out = routed.astype(jnp.float32) + _shared(params, x).astype(jnp.float32)
  return MoEOutput(out.astype(x.dtype), counts, jnp.zeros((), jnp.int32))


def init_params(key, config: MoEConfig, *, num_slots: int | None = None, dtype=jnp.float32,
                fp8_weights: bool = False) -> dict:
  """Random params (normal / sqrt(fan_in)); `num_slots` physical expert slots (default E).

  With `fp8_weights`, the expert weights (routed and shared) are block-quantized as an FP8
  checkpoint stores them (`{name}_scale_inv` beside each).
  """
  num_experts, hidden, inter = config.gate.num_experts, config.hidden_size, config.moe_intermediate_size
  slots = num_experts if num_slots is None else num_slots
  keys = jax.random.split(key, 8)
  normal_ = lambda k, shape, fan_in: (jax.random.normal(k, shape, jnp.float32) / fan_in ** 0.5).astype(dtype)
  params = {"gate": normal_(keys[0], (num_experts, hidden), hidden),
            "bias": jax.random.uniform(keys[1], (num_experts,), jnp.float32, 0.0, 0.1),
            "w_gate": normal_(keys[2], (slots, inter, hidden), hidden),
            "w_up": normal_(keys[3], (slots, inter, hidden), hidden),
            "w_down": normal_(keys[4], (slots, hidden, inter), inter)}
  if config.n_shared_experts:
    shared = config.n_shared_experts * inter
    params.update(shared_gate=normal_(keys[5], (shared, hidden), hidden),
                  shared_up=normal_(keys[6], (shared, hidden), hidden),
                  shared_down=normal_(keys[7], (hidden, shared), shared))
  if fp8_weights:
    for name in ("w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"):
      if name in params:
        params[name], params[name + SCALE_SUFFIX] = fp8.quantize_per_block(params[name].astype(jnp.float32))
  return params


class MoE(nnx.Module):
  """The MoE layer as a Flax NNX module.

  `bias` (V3's e_score_correction_bias, zeros at init; absent with `score_bias=False`, as in V2)
  is a non-trained `nnx.Variable`: DeepSeek adjusts it from the expert load, not by gradient.
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, score_bias: bool = True,
               fp8_weights: bool = False):
    self.config = config
    params = init_params(rngs.params(), config, dtype=dtype, fp8_weights=fp8_weights)
    bias = params.pop("bias")
    self.bias = nnx.Variable(jnp.zeros_like(bias)) if score_bias else None
    for name, value in params.items():
      setattr(self, name, nnx.Param(value))

  def params(self) -> dict:
    names = ("gate", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")
    names += tuple(name + SCALE_SUFFIX for name in names[1:])
    out = {name: getattr(self, name)[...] for name in names if hasattr(self, name)}
    if self.bias is not None:
      out["bias"] = self.bias[...]
    return out

  def __call__(self, x, **kwargs) -> MoEOutput:
    """`x [..., H]` -> `MoEOutput` with out `[..., H]`; kwargs as `moe_forward`."""
    lead = x.shape[:-1]
    result = moe_forward(self.params(), x.reshape(-1, x.shape[-1]), self.config, **kwargs)
    return result._replace(out=result.out.reshape(*lead, -1))
