"""Just-in-time XLA FFI custom calls in C++ and CUDA, and the local compute of expert-parallel dispatch.

`ffi.build` compiles `ffi/csrc/` into cached shared libraries on first use (g++ for CPU
handlers, nvcc for CUDA ones); `ffi.targets` registers them with XLA lazily. The first ops:
`dispatch_layout` (DeepEP's `get_dispatch_layout`), `dispatch_pack` and `combine_unpack`,
each with a jnp reference (`implementation="xla"`) and the custom calls (`"ffi"`).
"""

from ffi.build import BuildError, CompilerNotFoundError
from ffi.dispatch import DispatchLayout, PackedTokens, combine_unpack, dispatch_layout, dispatch_pack

__all__ = [
    "BuildError",
    "CompilerNotFoundError",
    "DispatchLayout",
    "PackedTokens",
    "combine_unpack",
    "dispatch_layout",
    "dispatch_pack",
]
