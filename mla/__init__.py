"""MLA decoding over a paged KV cache: FlashMLA's API in JAX.

`get_mla_metadata` plans a decode step's split-KV work; `flash_mla_with_kvcache` decodes
(block size 64, d_qk 576, d_v 512 in DeepSeek's models; MTP with causal masking; MQA and
GQA); `quantize_kv_cache` / `dequantize_kv_cache` convert to and from a dense FP8 cache of
656 bytes per token. `dense_decode` is the plain oracle. Rebuilds FlashMLA.
"""

from mla.api import flash_mla_with_kvcache
from mla.combine import combine_splits
from mla.dense import dense_decode
from mla.fp8_cache import dequantize_kv_cache, quantize_kv_cache
from mla.metadata import get_mla_metadata, get_num_sm_parts

__all__ = [
    "combine_splits",
    "dense_decode",
    "dequantize_kv_cache",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "get_num_sm_parts",
    "quantize_kv_cache",
]
