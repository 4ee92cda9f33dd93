"""Pipeline-parallel schedules and their executor (not built yet).

Will hold: 1F1B, ZB1P, DualPipe and DualPipeV as data, with bubble and memory analysis, an
executor that runs a schedule under `jax.shard_map`, and the training binary
(`python -m pipeline.train`). Rebuilds DualPipe.
"""
