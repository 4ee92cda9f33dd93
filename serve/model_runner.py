"""The only code that touches the device: the paged latent cache and one jitted step per batch shape.

A step computes `[batch, tokens]` new tokens of some sequences with `DeepseekV3.decode` (causal
over each sequence's cached tokens, so one call serves prompt chunks and single-token decoding
alike), writes their latent rows into the cache, and samples one token per sequence from the
logits of its last computed token. Shapes are padded to buckets (powers of two of the batch and
of the chunk length), so jit compiles a bounded set of programs. Padding rows and padded tails
write into the trash page, or into the sequence's own pages past its length (never read:
attention is causal, and those slots are rewritten when real tokens reach them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serve.block_manager import PAGE_SIZE, TRASH_PAGE
from serve.sampler import sample


class StepInput(NamedTuple):
  """One step, padded (numpy on the host, then device arrays).

  Attributes:
    tokens, positions: `[b, s]` int32; padding continues each row's positions.
    block_table: `[b, max_pages]` int32; unused entries are the trash page.
    last: `[b]` int32, the index in `s` of each row's last real token.
    temperature, top_k, top_p, seeds: `[b]` sampling settings (float32, int32, float32, uint32).
  """

  tokens: np.ndarray
  positions: np.ndarray
  block_table: np.ndarray
  last: np.ndarray
  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  seeds: np.ndarray


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n, at most `limit` (n <= limit)."""
  return min(1 << max(0, (n - 1).bit_length()), limit)


class ModelRunner:
  """Holds the model, the cache, and the compiled steps.

  Args:
    model: a `DeepseekV3`.
    num_pages: cache pages (page 0 is the trash page).
    max_pages_per_seq: block-table width: enough for the longest sequence plus a padded chunk.
    vocab_limit: see `serve.sampler.sample`.
  """

  def __init__(self, model, *, num_pages: int, max_pages_per_seq: int, vocab_limit: int):
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    # FlashMLA's cache is bfloat16 whatever the weights' dtype (queries are cast to it).
    self.cache = model.init_cache(num_pages, dtype=jnp.bfloat16)
    self.max_pages_per_seq = max_pages_per_seq
    self.vocab_limit = vocab_limit
    # One jit for all runners: engines of the same model and shapes (in one process) share programs.
    self._step = functools.partial(_step, self.graphdef, vocab_limit=vocab_limit)
    self.compiled_shapes: set[tuple[int, int]] = set()

  @property
  def page_bytes(self) -> int:
    """Bytes of one page across every layer (`[layers, 64, 1, D]` bfloat16)."""
    return self.cache[:, 0].size * self.cache.dtype.itemsize

  def read_page(self, page: int) -> np.ndarray:
    """One page of every layer, as `[page_bytes]` uint8 on the host."""
    return np.asarray(_read_page(self.cache, page)).reshape(-1).view(np.uint8)

  def write_pages(self, pages: list[int], data: np.ndarray) -> None:
    """Writes `data` (`[len(pages), page_bytes]` uint8 from `read_page`) into `pages`."""
    n = len(pages)
    padded = bucket(n, 1 << 30)  # a few compiled shapes; the padding rows go to the trash page
    index = np.full(padded, TRASH_PAGE, np.int32)
    index[:n] = pages
    rows = np.zeros((padded, self.page_bytes), np.uint8)
    rows[:n] = data[:n]
    layers, _, size, heads, width = self.cache.shape
    values = rows.view(self.cache.dtype).reshape(padded, layers, size, heads, width)
    self.cache = _write_pages(self.cache, jnp.asarray(index), jnp.asarray(values))

  def run(self, rows: list[tuple[list[int], int, list[int], tuple[float, int, float, int]]], *, batch: int,
          length: int) -> np.ndarray:
    """Computes one step and returns each row's sampled token.

    Args:
      rows: per sequence `(tokens to compute, position of the first, its pages, (temperature,
        top_k, top_p, seed))`.
      batch, length: the padded shape (`len(rows) <= batch`, every row's tokens `<= length`).

    Returns:
      `[len(rows)]` int32 tokens.
    """
    step = self.pad(rows, batch=batch, length=length)
    self.compiled_shapes.add((batch, length))
    tokens, self.cache = self._step(self.state, self.cache, *[jnp.asarray(a) for a in step])
    return np.asarray(tokens)[:len(rows)]

  def pad(self, rows, *, batch: int, length: int) -> StepInput:
    tokens = np.zeros((batch, length), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    table = np.full((batch, self.max_pages_per_seq), TRASH_PAGE, np.int32)
    last = np.zeros(batch, np.int32)
    temperature, top_k = np.zeros(batch, np.float32), np.zeros(batch, np.int32)
    top_p, seeds = np.ones(batch, np.float32), np.zeros(batch, np.uint32)
    for i, (ids, start, pages, (temp, k, p, seed)) in enumerate(rows):
      tokens[i, :len(ids)] = ids
      positions[i] = start + np.arange(length)
      table[i, :len(pages)] = pages
      last[i] = len(ids) - 1
      temperature[i], top_k[i], top_p[i], seeds[i] = temp, k, p, seed
    if positions.max() >= self.max_pages_per_seq * PAGE_SIZE:
      raise ValueError(f"position {positions.max()} is past the block table's {self.max_pages_per_seq} pages")
    return StepInput(tokens, positions, table, last, temperature, top_k, top_p, seeds)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("vocab_limit",), donate_argnums=(2,))
def _step(graphdef, state, cache, tokens, positions, block_table, last, temperature, top_k, top_p, seeds, *,
          vocab_limit: int):
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens, positions, cache, block_table)
  rows = logits[jnp.arange(tokens.shape[0]), last]
  next_positions = positions[jnp.arange(tokens.shape[0]), last] + 1
  return sample(rows, temperature, top_k, top_p, seeds, next_positions, vocab_limit=vocab_limit), cache


@jax.jit
def _read_page(cache, page):
  return cache[:, page]


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_pages(cache, pages, values):
  return cache.at[:, pages].set(jnp.moveaxis(values, 0, 1))
