"""The DeepSeek-V3 architecture in Flax NNX (in progress).

Built: `ModelConfig` (read from a Hugging Face `config.json`, validated, with tiny presets), the
layers (`model.layers`: RMSNorm, YaRN RoPE, MLA expanded and absorbed, the dense MLP, the
decoder layer with `expert_parallel`'s MoE), and `DeepseekV3` with MTP: logits, the training
loss, and prefill / decode over paged latent caches. Still to come: the safetensors checkpoints
in bf16 and FP8 (`from_pretrained`, `save_pretrained`) and the check against Hugging Face.
"""

from model.config import PRESETS, ModelConfig, YarnScaling
from model.transformer import DeepseekV3, LossOutput, MTPModule

__all__ = ["PRESETS", "DeepseekV3", "LossOutput", "MTPModule", "ModelConfig", "YarnScaling"]
