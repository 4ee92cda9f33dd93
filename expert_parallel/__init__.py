"""Expert-parallel token dispatch and combine across an `ep` mesh axis (not built yet).

Will hold: the dispatch layout, normal (high-throughput) and low-latency masked modes,
FP8 dispatch, custom VJPs, and the MoE layer built from them. Rebuilds DeepEP.
"""
