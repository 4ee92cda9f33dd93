"""The DeepSeek-V3 architecture in Flax NNX (in progress).

Built: `ModelConfig` (read from a Hugging Face `config.json`, validated, with tiny presets) and
the first layers (`model.layers`: RMSNorm, YaRN RoPE and MLA's softmax scale). Still to come:
MLA attention (expanded and absorbed), the MoE and dense blocks (from `expert_parallel`), MTP,
the training and inference forwards, and the safetensors checkpoints in bf16 and FP8.
"""

from model.config import PRESETS, ModelConfig, YarnScaling

__all__ = ["PRESETS", "ModelConfig", "YarnScaling"]
