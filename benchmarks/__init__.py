"""CPU and GPU benchmarks. `python -m benchmarks` runs every suite and prints one table."""
