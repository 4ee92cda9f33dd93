"""Where each `DeepseekV3` parameter lives in a Hugging Face / DeepSeek-V3 safetensors checkpoint.

A parameter is one of three layouts of checkpoint tensors:
- *plain*: one tensor of the same shape (norms, the embedding, the gate, shared experts);
- *transposed*: one `[out, in]` Linear weight held here as an `[in, out]` kernel;
- *stacked*: routed experts `[E, a, b]`, one `[a, b]` tensor per expert
  (`mlp.experts.{e}.gate_proj.weight`, ...).

MTP depth k lives under `model.layers.{num_hidden_layers + k}` as in DeepSeek's checkpoint:
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the decoder block's own names, and copies of
the embedding (`embed_tokens`) and output head (`shared_head.head`) that this model shares
with the main model (`mtp_copies`).

FP8 checkpoints quantize the weights `is_quantizable` names, each with a companion
`{name}_scale_inv` of `[ceil(out / 128), ceil(in / 128)]` float32 block scales.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from model.config import ModelConfig

SCALE_SUFFIX = "_scale_inv"
_EXPERT_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_SHARED_PROJ = {"shared_gate": "gate_proj", "shared_up": "up_proj", "shared_down": "down_proj"}
_QUANTIZABLE = re.compile(r"\.(self_attn|mlp)\.(.+\.)?\w+_proj(_with_mqa)?\.weight$")


class Source(NamedTuple):
  """The checkpoint tensors behind one parameter."""
  names: tuple[str, ...]  # one name, or one per expert when stacked
  transposed: bool = False  # the parameter is the tensor's transpose ([in, out] kernel of an [out, in] weight)
  stacked: bool = False  # the parameter stacks `names` along a new leading axis


def _block(prefix: str, rest: tuple, config: ModelConfig) -> Source:
  """A decoder block's parameter path (below the block) under `prefix` (`model.layers.{i}`)."""
  head, leaf = rest[0], rest[-1]
  if head in ("input_layernorm", "post_attention_layernorm") and rest[1:] == ("weight",):
    return Source((f"{prefix}.{head}.weight",))
  if head in ("self_attn", "mlp") and len(rest) == 3:
    if leaf == "kernel":  # a float projection
      return Source((f"{prefix}.{head}.{rest[1]}.weight",), transposed=True)
    if leaf in ("weight", "weight" + SCALE_SUFFIX):  # a norm, or an FP8 projection as stored
      return Source((f"{prefix}.{head}.{rest[1]}.{leaf}",))
  if head == "mlp":
    if rest[1:] == ("gate",):
      return Source((f"{prefix}.mlp.gate.weight",))
    if rest[1:] == ("bias",):
      return Source((f"{prefix}.mlp.gate.e_score_correction_bias",))
    base, suffix = (leaf[:-len(SCALE_SUFFIX)], SCALE_SUFFIX) if leaf.endswith(SCALE_SUFFIX) else (leaf, "")
    if len(rest) == 2 and base in _EXPERT_PROJ:
      names = tuple(f"{prefix}.mlp.experts.{e}.{_EXPERT_PROJ[base]}.weight{suffix}"
                    for e in range(config.n_routed_experts))
      return Source(names, stacked=True)
    if len(rest) == 2 and base in _SHARED_PROJ:
      return Source((f"{prefix}.mlp.shared_experts.{_SHARED_PROJ[base]}.weight{suffix}",))
  raise ValueError(f"no checkpoint name for the decoder-block parameter {'.'.join(map(str, rest))}")


def source(path: tuple, config: ModelConfig) -> Source:
  """The checkpoint tensors of the parameter at `path` (an `nnx` state path such as `('layers', 1, 'mlp', 'w_up')`)."""
  head = path[0]
  if path == ("embed_tokens", "embedding"):
    return Source(("model.embed_tokens.weight",))
  if path == ("norm", "weight"):
    return Source(("model.norm.weight",))
  if path == ("lm_head", "kernel"):
    return Source(("lm_head.weight",), transposed=True)
  if head == "layers":
    return _block(f"model.layers.{path[1]}", path[2:], config)
  if head == "mtp":
    prefix = f"model.layers.{config.num_hidden_layers + path[1]}"
    rest = path[2:]
    if rest in (("enorm", "weight"), ("hnorm", "weight")):
      return Source((f"{prefix}.{rest[0]}.weight",))
    if rest == ("eh_proj", "kernel"):
      return Source((f"{prefix}.eh_proj.weight",), transposed=True)
    if rest == ("shared_head_norm", "weight"):
      return Source((f"{prefix}.shared_head.norm.weight",))
    if rest[0] == "block":
      return _block(prefix, rest[1:], config)
  raise ValueError(f"no checkpoint name for the parameter {'.'.join(map(str, path))}")


def mtp_copies(config: ModelConfig) -> dict[str, str]:
  """`{MTP tensor: main tensor}`: what DeepSeek's checkpoint repeats in each MTP layer."""
  out = {}
  for k in range(config.num_nextn_predict_layers):
    prefix = f"model.layers.{config.num_hidden_layers + k}"
    out[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
    out[f"{prefix}.shared_head.head.weight"] = ("model.embed_tokens.weight" if config.tie_word_embeddings
                                                else "lm_head.weight")
  return out


def mtp_prefixes(config: ModelConfig) -> tuple[str, ...]:
  """The name prefixes of the MTP layers (`model.layers.{L + k}.`)."""
  return tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))


def is_quantizable(name: str) -> bool:
  """Whether DeepSeek's FP8 checkpoints store this tensor in e4m3 with block scales (the attention and MLP projections)."""
  return bool(_QUANTIZABLE.search(name))
