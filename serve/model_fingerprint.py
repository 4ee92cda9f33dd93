"""A model's fingerprint: the root of every KV page's prefix hash.

Page keys chain xxh3-128 over token blocks; a chain that started from the tokens alone would let
two servers of different weights (two fine-tunes of one architecture, or one model in float32 and
in bfloat16) read each other's pages from a shared KV-cache store and silently compute with the
wrong cache. Keys therefore start from a fingerprint of what the cache rows depend on: the
config, the cache layout (the MTP layer of speculative decoding), and the weights' dtypes,
shapes and values. The values are sampled, 256 evenly spaced elements of every parameter,
gathered by one jitted call, so no weights are copied whole to the host; fine-tuned weights
differ nearly everywhere. Equal weights loaded anywhere give equal fingerprints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import xxhash
from flax import nnx

_SAMPLES = 256


def model_fingerprint(model, *, num_speculative_tokens: int = 0) -> bytes:
  """16 bytes for `model` (a `DeepseekV3`) serving with `num_speculative_tokens`."""
  state = nnx.state(model, nnx.Param)
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = [leaf for _, leaf in paths_and_leaves]
  digest = xxhash.xxh3_128()
  digest.update(repr(model.config).encode())
  digest.update(f"cache layers: main + {num_speculative_tokens} MTP".encode())
  for (path, leaf), sample in zip(paths_and_leaves, _samples(leaves)):
    digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
    digest.update(np.ascontiguousarray(np.asarray(sample)).tobytes())
  return digest.digest()


@jax.jit
def _samples(leaves):
  out = []
  for leaf in leaves:
    flat = jnp.ravel(leaf)
    stride = max(1, flat.shape[0] // _SAMPLES)
    out.append(flat[::stride][:_SAMPLES])
  return out
