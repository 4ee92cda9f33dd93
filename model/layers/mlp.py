"""The dense SwiGLU MLP of DeepSeek's first `first_k_dense_replace` layers: `down(silu(gate(x)) * up(x))`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """Hugging Face's DeepseekV3MLP: gate_proj, up_proj `[H -> I]`, down_proj `[I -> H]`, no biases."""

  def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(hidden_size, intermediate_size)
    self.up_proj = linear(hidden_size, intermediate_size)
    self.down_proj = linear(intermediate_size, hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., H]` -> `[..., H]`."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
