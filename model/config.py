"""`ModelConfig`: DeepSeek-V3 (and V2) hyperparameters, validated on creation, read from a Hugging Face `config.json`.

Field names are Hugging Face's, so `ModelConfig.from_hf(json.load(...))` is a rename-free copy;
keys this model does not use (`num_key_value_heads`, `torch_dtype`, ...) are ignored, and a
missing optional key takes the default DeepSeek's own configs imply. Named tiny presets
(`PRESETS`, `ModelConfig.preset(name)`) serve tests and demos.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Mapping

import expert_parallel as ep

TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")  # V3; V2; V2-Lite
SCORING_FUNCS = ("sigmoid", "softmax")
_YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim"}


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """`rope_scaling` of type "yarn", with Hugging Face DeepSeek's defaults; hashable, so a config can be a static argument."""
  factor: float
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0

  @classmethod
  def from_hf(cls, scaling: Mapping[str, Any]) -> "YarnScaling":
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
      raise ValueError(f"rope_scaling must be YaRN (type 'yarn'), got {kind!r}")
    unknown = set(scaling) - _YARN_KEYS
    if unknown:
      raise ValueError(f"rope_scaling has unknown keys {sorted(unknown)}")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or factor < 1:
      raise ValueError(f"rope_scaling['factor'] must be a number >= 1, got {factor!r}")
    values = {k: scaling[k] for k in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                                      "mscale_all_dim") if k in scaling}
    return cls(factor=float(factor), **values)

  def to_hf(self) -> dict[str, Any]:
    return {"type": "yarn", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Size
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  # MLA
  q_lora_rank: int | None  # None: q is projected directly (V2-Lite)
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  # MoE
  n_routed_experts: int | None  # None: every layer is dense
  n_shared_experts: int = 0
  num_experts_per_tok: int = 1
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  scoring_func: str = "sigmoid"
  topk_method: str = "noaux_tc"
  norm_topk_prob: bool = True
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  # Position
  rope_theta: float = 10000.0
  rope_scaling: YarnScaling | None = None  # a config.json dict is converted on creation
  max_position_embeddings: int = 4096
  # Other
  num_nextn_predict_layers: int = 0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  rope_interleave: bool = True  # RoPE pairs (2i, 2i+1), DeepSeek's layout; False: (i, i + d/2)

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings")
    for name in positive:
      _check_int(name, getattr(self, name), minimum=1)
    for name in ("q_lora_rank", "n_routed_experts"):
      if getattr(self, name) is not None:
        _check_int(name, getattr(self, name), minimum=1)
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
      _check_int(name, getattr(self, name), minimum=0)
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
    if self.scoring_func not in SCORING_FUNCS:
      raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
    if self.topk_method not in TOPK_METHODS:
      raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
    if not isinstance(self.rope_interleave, bool):
      raise ValueError(f"rope_interleave must be a bool, got {self.rope_interleave!r}")
    for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if self.first_k_dense_replace > self.num_hidden_layers:
      raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} exceeds num_hidden_layers="
                       f"{self.num_hidden_layers}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
      if not isinstance(self.rope_scaling, Mapping):
        raise ValueError(f"rope_scaling must be a YaRN dict or None, got {type(self.rope_scaling).__name__}")
      object.__setattr__(self, "rope_scaling", YarnScaling.from_hf(self.rope_scaling))
    if self.n_routed_experts is not None:
      self.gate_config()  # raises ValueError naming the routing field that is wrong

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  def is_moe_layer(self, layer: int) -> bool:
    """DeepSeek's rule: MoE from layer `first_k_dense_replace` on, every `moe_layer_freq`-th layer."""
    return (self.n_routed_experts is not None and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0)

  def gate_config(self) -> ep.GateConfig:
    """The routing of the MoE layers: V3's bias + group top-2 sums, V2's group max, or V2-Lite's plain top-k."""
    grouped = self.topk_method != "greedy"
    return ep.GateConfig(num_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                         n_group=self.n_group if grouped else 1, topk_group=self.topk_group if grouped else 1,
                         scoring_func=self.scoring_func, norm_topk_prob=self.norm_topk_prob,
                         routed_scaling_factor=float(self.routed_scaling_factor))

  @property
  def uses_score_bias(self) -> bool:
    """V3's `e_score_correction_bias` (only with topk_method="noaux_tc")."""
    return self.topk_method == "noaux_tc"

  @classmethod
  def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "ModelConfig":
    """From a Hugging Face DeepSeek-V3/V2 `config.json` (a dict, the file, or its directory)."""
    if not isinstance(config, Mapping):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path) as f:
        config = json.load(f)
    config = _legacy_rope(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in config]
    if missing:
      raise ValueError(f"config.json lacks {missing}")
    return cls(**{k: v for k, v in config.items() if k in fields})

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict Hugging Face's DeepseekV3 reads (with its architecture and model type)."""
    out = dataclasses.asdict(self)
    out["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
    out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
               num_key_value_heads=self.num_attention_heads)
    return out

  @classmethod
  def preset(cls, name: str) -> "ModelConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def _legacy_rope(config: Mapping[str, Any]) -> dict[str, Any]:
  """transformers 5 writes `rope_parameters` (theta inside) instead of `rope_theta` + `rope_scaling`: read either."""
  config = dict(config)
  params = config.pop("rope_parameters", None)
  if params is None:
    return config
  if not isinstance(params, Mapping):
    raise ValueError(f"rope_parameters must be a dict, got {type(params).__name__}")
  params = dict(params)
  theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
  if "rope_theta" in config and config["rope_theta"] != theta:
    raise ValueError(f"rope_theta={config['rope_theta']} conflicts with rope_parameters['rope_theta']={theta}")
  if params.pop("truncate", True) is not True:
    raise ValueError("rope_parameters['truncate']=False is not DeepSeek's YaRN (its correction range is truncated)")
  if params.pop("attention_factor", None) is not None:
    raise ValueError("rope_parameters['attention_factor'] is not supported: DeepSeek's YaRN derives it from mscale")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default" and set(params) - {"rope_type", "type"}:
    raise ValueError(f"rope_parameters of type 'default' has keys it does not use: {sorted(set(params))}")
  scaling = None if kind == "default" else params
  if config.get("rope_scaling") not in (None, scaling):
    raise ValueError(f"rope_scaling={config['rope_scaling']} conflicts with rope_parameters={params}")
  config.update(rope_theta=theta, rope_scaling=scaling)
  return config


def _check_int(name: str, value, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


PRESETS: dict[str, ModelConfig] = {
    # 4 layers (1 dense, 3 MoE), hidden 256, 8 experts in 4 groups, one MTP module: tests and demos.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, rope_scaling={
            "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=1024, num_nextn_predict_layers=1),
}
# The pipeline's demo: tiny with 4 MoE layers, which split into 1, 2 or 4 alike pipeline stages.
PRESETS["demo"] = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=5)
