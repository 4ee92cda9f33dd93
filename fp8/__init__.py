"""FP8 block-scaled formats and GEMMs (not built yet).

Will hold: e4m3 with 1x128 activation and 128x128 weight scales, `gemm_nt`, the m-grouped
contiguous and masked GEMMs, the k-grouped GEMM, and an FP8 linear layer with a custom VJP.
Rebuilds DeepGEMM.
"""
