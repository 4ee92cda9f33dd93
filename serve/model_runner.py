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
from jax.sharding import NamedSharding, PartitionSpec as P

from model.sharding import EP_AXIS, state_specs
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
    mesh: None for one device; or a mesh with an `ep` axis, whose ranks each hold a cache of
      `num_pages` pages (`[ranks, layers, num_pages, 64, 1, D]`, split over `ep`) and run their
      own rows, the model's routed experts split over `ep` (`model.sharding`).
  """

  def __init__(self, model, *, num_pages: int, max_pages_per_seq: int, vocab_limit: int, mesh=None):
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.max_pages_per_seq = max_pages_per_seq
    self.vocab_limit = vocab_limit
    self.mesh = mesh
    self.ranks = 1 if mesh is None else mesh.shape[EP_AXIS]
    self.compiled_shapes: set[tuple[int, int]] = set()
    # FlashMLA's cache is bfloat16 whatever the weights' dtype (queries are cast to it).
    cache = model.init_cache(num_pages, dtype=jnp.bfloat16)
    if mesh is None:
      self.cache = cache
      # One jit for all runners: engines of the same model and shapes (in one process) share programs.
      self._step = functools.partial(_step, self.graphdef, vocab_limit=vocab_limit)
      return
    # Data-parallel attention, experts over `ep` (DeepSeek's decode layout): each rank holds a
    # cache of its own and runs its own rows; the MoE layers dispatch tokens to the experts' ranks.
    self._rows = NamedSharding(mesh, P(EP_AXIS))
    self.cache = jax.device_put(jnp.broadcast_to(cache, (self.ranks, *cache.shape)), self._rows)
    graphdef = self.graphdef

    def local(state, cache, *step):
      tokens, cache = _local_step(graphdef, state, cache[0], *step, vocab_limit=vocab_limit,
                                  moe_kwargs={"axis_name": EP_AXIS})
      return tokens, cache[None]

    self._write = _rank_writer(mesh)
    specs = state_specs(self.state, mesh)
    self._step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, *[P(EP_AXIS)] * 9),
                                       out_specs=(P(EP_AXIS), P(EP_AXIS))), donate_argnums=(1,))

  @property
  def page_bytes(self) -> int:
    """Bytes of one page across every layer (`[layers, 64, 1, D]` bfloat16)."""
    layers, _, size, heads, width = self.cache.shape[-5:]
    return layers * size * heads * width * self.cache.dtype.itemsize

  def read_page(self, page: int, rank: int = 0) -> np.ndarray:
    """One page of every layer of `rank`'s cache, as `[page_bytes]` uint8 on the host."""
    if self.mesh is None:
      return np.asarray(_read_page(self.cache, page)).reshape(-1).view(np.uint8)
    shard = next(s for s in self.cache.addressable_shards if (s.index[0].start or 0) == rank)
    return np.asarray(shard.data[0, :, page]).reshape(-1).view(np.uint8)

  def write_pages(self, pages: list[int], data: np.ndarray, rank: int = 0) -> None:
    """Writes `data` (`[len(pages), page_bytes]` uint8 from `read_page`) into `rank`'s `pages`."""
    n = len(pages)
    padded = bucket(n, 1 << 30)  # a few compiled shapes; the padding rows go to the trash page
    index = np.full(padded, TRASH_PAGE, np.int32)
    index[:n] = pages
    rows = np.zeros((padded, self.page_bytes), np.uint8)
    rows[:n] = data[:n]
    layers, _, size, heads, width = self.cache.shape[-5:]
    values = rows.view(self.cache.dtype).reshape(padded, layers, size, heads, width)
    if self.mesh is None:
      self.cache = _write_pages(self.cache, jnp.asarray(index), jnp.asarray(values))
      return
    local = np.zeros((self.ranks, padded), np.int32)  # the other ranks write their trash page
    local[rank] = index
    replicated = jax.device_put(values, NamedSharding(self.mesh, P()))
    self.cache = self._write(self.cache, jax.device_put(local, self._rows), replicated)

  def run(self, rows: list[tuple[list[int], int, list[int], tuple[float, int, float, int]]], *, batch: int,
          length: int, ranks: list[int] | None = None) -> np.ndarray:
    """Computes one step and returns each row's sampled token.

    Args:
      rows: per sequence `(tokens to compute, position of the first, its pages, (temperature,
        top_k, top_p, seed))`.
      batch, length: the padded shape (`len(rows) <= batch`, every row's tokens `<= length`);
        with a mesh, `batch` rows per rank.
      ranks: with a mesh, the rank each row runs on (its pages are in that rank's cache).

    Returns:
      `[len(rows)]` int32 tokens.
    """
    self.compiled_shapes.add((batch, length))
    if self.mesh is None:
      step = self.pad(rows, batch=batch, length=length)
      tokens, self.cache = self._step(self.state, self.cache, *[jnp.asarray(a) for a in step])
      return np.asarray(tokens)[:len(rows)]
    # `batch` rows per rank, in rank order; `ranks[i]` says where row i runs.
    order = [[i for i, rank in enumerate(ranks) if rank == r] for r in range(self.ranks)]
    parts = [self.pad([rows[i] for i in rows_of], batch=batch, length=length) for rows_of in order]
    step = [jax.device_put(np.concatenate(field), self._rows) for field in zip(*parts)]
    tokens, self.cache = self._step(self.state, self.cache, *step)
    tokens = np.asarray(tokens).reshape(self.ranks, batch)
    out = np.zeros(len(rows), np.int32)
    for r, rows_of in enumerate(order):
      out[rows_of] = tokens[r, :len(rows_of)]
    return out

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
    if rows and positions.max() >= self.max_pages_per_seq * PAGE_SIZE:
      raise ValueError(f"position {positions.max()} is past the block table's {self.max_pages_per_seq} pages")
    return StepInput(tokens, positions, table, last, temperature, top_k, top_p, seeds)


def _local_step(graphdef, state, cache, tokens, positions, block_table, last, temperature, top_k, top_p, seeds, *,
                vocab_limit: int, moe_kwargs=None):
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens, positions, cache, block_table, moe_kwargs=moe_kwargs)
  rows = logits[jnp.arange(tokens.shape[0]), last]
  next_positions = positions[jnp.arange(tokens.shape[0]), last] + 1
  return sample(rows, temperature, top_k, top_p, seeds, next_positions, vocab_limit=vocab_limit), cache


_step = functools.partial(jax.jit, static_argnums=(0,), static_argnames=("vocab_limit",),
                          donate_argnums=(2,))(_local_step)


def _rank_writer(mesh):
  """A jitted `(cache, pages [ranks, n], values) -> cache` in which each rank writes `values`
  into its own row of `pages` (the other ranks' rows name their trash page)."""

  def local(cache, pages, values):
    return cache.at[0, :, pages[0]].set(jnp.moveaxis(values, 0, 1).astype(cache.dtype))

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(EP_AXIS), P(EP_AXIS), P()), out_specs=P(EP_AXIS)),
                 donate_argnums=(0,))


@jax.jit
def _read_page(cache, page):
  return cache[:, page]


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_pages(cache, pages, values):
  return cache.at[:, pages].set(jnp.moveaxis(values, 0, 1))
