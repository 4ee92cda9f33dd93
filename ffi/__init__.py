"""Just-in-time XLA FFI custom calls in C++ and CUDA (not built yet).

Will hold: a builder that compiles `ffi/csrc/` with g++ and nvcc, a cache keyed by a hash of
source, compiler and flags, and lazy registration of FFI targets for CPU and CUDA.
Rebuilds the JIT of DeepGEMM in the manner of JAX's `examples/ffi`.
"""
