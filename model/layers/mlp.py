"""The dense SwiGLU MLP of DeepSeek's first `first_k_dense_replace` layers: `down(silu(gate(x)) * up(x))`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers.linear import projection


class MLP(nnx.Module):
  """Hugging Face's DeepseekV3MLP: gate_proj, up_proj `[H -> I]`, down_proj `[I -> H]`, no biases (FP8Linear with fp8_weights)."""

  def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, fp8_weights: bool = False):
    linear = lambda i, o: projection(i, o, rngs=rngs, dtype=dtype, param_dtype=param_dtype, fp8_weights=fp8_weights)
    self.gate_proj = linear(hidden_size, intermediate_size)
    self.up_proj = linear(hidden_size, intermediate_size)
    self.down_proj = linear(intermediate_size, hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., H]` -> `[..., H]`."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
