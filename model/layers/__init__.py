"""DeepSeek-V3's layers in Flax NNX: RMSNorm, YaRN RoPE, and MLA (expanded and absorbed)."""

from model.layers.attention import MLA, rotary_tables, write_cache
from model.layers.norm import RMSNorm
from model.layers.rope import RotaryEmbedding, apply_rotary, softmax_scale, yarn_inv_freq

__all__ = ["MLA", "RMSNorm", "RotaryEmbedding", "apply_rotary", "rotary_tables", "softmax_scale", "write_cache",
           "yarn_inv_freq"]
