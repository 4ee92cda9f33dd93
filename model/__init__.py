"""The DeepSeek-V3 architecture in Flax NNX, with Hugging Face safetensors checkpoints.

`ModelConfig` (read from a Hugging Face `config.json`, validated, with tiny presets), the layers
(`model.layers`: RMSNorm, YaRN RoPE, MLA expanded and absorbed, the dense MLP, the decoder
layer with `expert_parallel`'s MoE), `DeepseekV3` with MTP (logits, the training loss, prefill
and decode over paged latent caches), and `from_pretrained` / `save_pretrained` for DeepSeek's
checkpoint format in bf16, f32 or FP8 (`model.checkpoint`), placed on a mesh by
`model.sharding`'s layout. `DEMO_CHECKPOINT` is the small trained model that ships with the
repository (made by `scripts/make_demo_checkpoint.sh`; see docs/demo_checkpoint.md).
"""

import os as _os

from model.checkpoint import from_pretrained, save_pretrained
from model.config import PRESETS, ModelConfig, YarnScaling
from model.sharding import shard_model
from model.transformer import DeepseekV3, LossOutput, MTPModule

DEMO_CHECKPOINT = _os.path.join(_os.path.dirname(__file__), "demo_checkpoint")

__all__ = ["DEMO_CHECKPOINT", "PRESETS", "DeepseekV3", "LossOutput", "MTPModule", "ModelConfig", "YarnScaling", "from_pretrained",
           "save_pretrained", "shard_model"]
