"""FP8 block-scaled formats and DeepGEMM's GEMMs in JAX, plus an FP8 linear layer for training.

Formats: e4m3 with one f32 scale per 1x128 tile (activations, `quantize_per_token`), per
128x128 tile (weights, `quantize_per_block`) or per 128x1 tile (wgrad operands,
`quantize_per_channel`), optionally rounded to powers of two (UE8M0).

Inference on weights stored in FP8 (a DeepSeek-V3 FP8 checkpoint): `matmul_quantized`, with
`dense` / `block_quantized` converting a weight either way.

GEMMs (`D = C + A @ B.T`, f32 accumulation promoted per 128-wide k block): `gemm_nt`,
`m_grouped_gemm_nt_contiguous`, `m_grouped_gemm_nt_masked`, `k_grouped_gemm_tn_contiguous`.
Rebuilds DeepGEMM.
"""

from fp8.api import (gemm_nt, k_grouped_gemm_tn_contiguous, m_grouped_gemm_nt_contiguous,
                     m_grouped_gemm_nt_masked)
from fp8.formats import (FP8_MAX, ceil_to_ue8m0, dequantize, quantize_per_block, quantize_per_channel,
                         quantize_per_token)
from fp8.inference import block_quantized, dense, gemm_fits, matmul_quantized
from fp8.layout import contiguous_m_indices, get_m_alignment_for_contiguous_layout
from fp8.linear import Linear, linear
from fp8.metrics import calc_diff

__all__ = [
    "FP8_MAX",
    "Linear",
    "block_quantized",
    "calc_diff",
    "ceil_to_ue8m0",
    "contiguous_m_indices",
    "dense",
    "dequantize",
    "gemm_fits",
    "gemm_nt",
    "get_m_alignment_for_contiguous_layout",
    "k_grouped_gemm_tn_contiguous",
    "linear",
    "m_grouped_gemm_nt_contiguous",
    "m_grouped_gemm_nt_masked",
    "matmul_quantized",
    "quantize_per_block",
    "quantize_per_channel",
    "quantize_per_token",
]
