"""Expert-parallel token dispatch and combine across an `ep` mesh axis, DeepEP's semantics in JAX.

- `get_dispatch_layout`: where each token goes (DeepEP's layout).
- `dispatch` / `combine`: normal (high-throughput) mode, static shapes with a receive capacity,
  FP8 dispatch with scales, custom VJPs (backward of dispatch = combine and vice versa).
- `low_latency_dispatch` / `low_latency_combine`: the masked per-expert layout that
  `fp8.m_grouped_gemm_nt_masked` consumes.
- `MoE` / `moe_forward` / `moe_decode`: DeepSeek-V3's MoE layer (gate, shared and routed experts,
  redundant experts from a balancer placement) built on them.
Every function but the layout runs inside `jax.shard_map` over `axis_name` ("ep").
"""

from expert_parallel.gate import GateConfig, route
from expert_parallel.low_latency import low_latency_combine, low_latency_dispatch
from expert_parallel.moe import MoE, MoEConfig, MoEOutput, Placement, init_params, moe_decode, moe_forward
from expert_parallel.normal import combine, dispatch
from expert_parallel.routing import get_dispatch_layout
from expert_parallel.types import DispatchHandle, DispatchResult, LowLatencyHandle

__all__ = [
    "DispatchHandle",
    "DispatchResult",
    "GateConfig",
    "LowLatencyHandle",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "Placement",
    "combine",
    "dispatch",
    "get_dispatch_layout",
    "init_params",
    "low_latency_combine",
    "low_latency_dispatch",
    "moe_decode",
    "moe_forward",
    "route",
]
