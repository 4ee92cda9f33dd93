"""MLA decoding over a paged KV cache (not built yet).

Will hold: `get_mla_metadata` and `flash_mla_with_kvcache` (block size 64, d_qk 576, d_v 512),
split-KV with an LSE combine, MTP and an FP8 KV cache. Rebuilds FlashMLA.
"""
