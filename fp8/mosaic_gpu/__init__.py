"""DeepGEMM-class Hopper kernels for the four FP8 GEMMs, in Pallas Mosaic GPU (`implementation="mosaic_gpu"`).

`ops` builds tile lists and layouts, `kernel` is the one warp-specialized, persistent kernel with
per-128-k promotion, `config` chooses block sizes; `backends.mosaic_interpret` holds the interpreter's params.
"""

from fp8.mosaic_gpu.ops import (gemm_nt, k_grouped_gemm_tn_contiguous, m_grouped_gemm_nt_contiguous,
                                m_grouped_gemm_nt_masked)

__all__ = ["gemm_nt", "k_grouped_gemm_tn_contiguous", "m_grouped_gemm_nt_contiguous", "m_grouped_gemm_nt_masked"]
