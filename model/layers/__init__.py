"""DeepSeek-V3's layers in Flax NNX: RMSNorm and YaRN RoPE so far."""

from model.layers.norm import RMSNorm
from model.layers.rope import RotaryEmbedding, apply_rotary, softmax_scale, yarn_inv_freq

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rotary", "softmax_scale", "yarn_inv_freq"]
