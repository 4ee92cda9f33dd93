"""Expert-parallel load balancing: DeepSeek's EPLB rebuilt in numpy, plus load tracking and re-layout.

`rebalance_experts` places replicas of the logical experts onto GPUs; `balancedness` scores
a placement; `ExpertLoad` tracks per-expert token counts inside jit; `apply_placement` and
`select_replicas` lay a model's expert weights out again and route tokens to replicas.
"""

from balancer.api import rebalance_experts
from balancer.load import ExpertLoad, count_expert_tokens
from balancer.placement import apply_placement, select_replicas
from balancer.quality import balancedness, gpu_loads, unbalanced_baseline

__all__ = [
    "ExpertLoad",
    "apply_placement",
    "balancedness",
    "count_expert_tokens",
    "gpu_loads",
    "rebalance_experts",
    "select_replicas",
    "unbalanced_baseline",
]
