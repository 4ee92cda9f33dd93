"""The only code that touches the device: the paged latent cache and one jitted step per batch shape.

A step computes `[batch, tokens]` new tokens of some sequences with `DeepseekV3.decode_hidden`
(causal over each sequence's cached tokens, so one call serves prompt chunks and single-token
decoding alike), writes their latent rows into the cache, and samples one token per sequence
after its last known token. Shapes are padded to buckets (powers of two of the batch and of the
chunk length), so jit compiles a bounded set of programs. Padding rows and padded tails write
into the trash page, or into the sequence's own pages past its length (never read: attention is
causal, and those slots are rewritten when real tokens reach them).

Speculative decoding (DeepSeek-V3's MTP): a decode row is `[newest token, draft]`. The token
after the newest is sampled as always; the draft is accepted when that sample equals it, and
then the token after the draft is sampled too. Sampling first and comparing is exact for a
deterministic draft: the draft is kept with probability p(draft), and otherwise the sample is
p conditioned on not being the draft, speculative sampling's residual. Every token is sampled
with its position's key, so outputs equal plain decoding's. The MTP module then runs over the
step's positions (its own cache layer) and drafts the token after the last accepted one.
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

_VERIFY_LENGTH = 2  # the only step length that carries drafts: [newest token, draft]


class StepInput(NamedTuple):
  """One step, padded (numpy on the host, then device arrays).

  Attributes:
    tokens, positions: `[b, s]` int32; padding continues each row's positions.
    block_table: `[b, max_pages]` int32; unused entries are the trash page.
    last: `[b]` int32, the index in `s` of each row's last real token (a draft included).
    known: `[b]` int32, the row's tokens that are not a draft (>= 1); the token after the
      `known`-th is sampled.
    next_token: `[b]` int32, the token following the row's known tokens when it is already known
      (a prompt chunk that is not the last), else -1; the MTP module's input at that position.
    temperature, top_k, top_p, seeds: `[b]` sampling settings (float32, int32, float32, uint32).
  """

  tokens: np.ndarray
  positions: np.ndarray
  block_table: np.ndarray
  last: np.ndarray
  known: np.ndarray
  next_token: np.ndarray
  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  seeds: np.ndarray


class StepRow(NamedTuple):
  """One sequence's part of a step.

  Attributes:
    tokens: the tokens to compute (known ones, then at most one draft).
    start: the position of the first.
    pages: the sequence's pages.
    sampling: `(temperature, top_k, top_p, seed)`.
    known: how many of `tokens` are not a draft; None: all of them.
    next_token: the token after the known ones when already known, else -1 (see `StepInput`).
  """

  tokens: list[int]
  start: int
  pages: list[int]
  sampling: tuple[float, int, float, int]
  known: int | None = None
  next_token: int = -1


class StepResult(NamedTuple):
  """What a step gives each row (numpy, `[rows]` int32 each).

  Attributes:
    first: the token sampled after the row's known tokens.
    accepted: 1 when the row's draft equalled `first` (the draft's position is then computed).
    second: the token sampled after the draft; valid where accepted.
    draft: the MTP module's draft of the token after the row's last new token (-1 when not speculative).
  """

  first: np.ndarray
  accepted: np.ndarray
  second: np.ndarray
  draft: np.ndarray


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
    speculative: draft one token per decode step with the model's first MTP module (its cache
      layer is added to the cache).
    mesh: None for one device; or a mesh with an `ep` axis, whose ranks each hold a cache of
      `num_pages` pages (`[ranks, layers, num_pages, 64, 1, D]`, split over `ep`) and run their
      own rows, the model's routed experts split over `ep` (`model.sharding`).
  """

  def __init__(self, model, *, num_pages: int, max_pages_per_seq: int, vocab_limit: int, speculative: bool = False,
               mesh=None):
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.max_pages_per_seq = max_pages_per_seq
    self.vocab_limit = vocab_limit
    self.speculative = speculative
    self.mesh = mesh
    self.ranks = 1 if mesh is None else mesh.shape[EP_AXIS]
    self.compiled_shapes: set[tuple[int, int]] = set()
    # FlashMLA's cache is bfloat16 whatever the weights' dtype (queries are cast to it).
    cache = model.init_cache(num_pages, dtype=jnp.bfloat16, mtp_depths=int(speculative))
    if mesh is None:
      self.cache = cache
      # One jit for all runners: engines of the same model and shapes (in one process) share programs.
      self._step = functools.partial(_step, self.graphdef, vocab_limit=vocab_limit, speculative=speculative)
      return
    # Data-parallel attention, experts over `ep` (DeepSeek's decode layout): each rank holds a
    # cache of its own and runs its own rows; the MoE layers dispatch tokens to the experts' ranks.
    self._rows = NamedSharding(mesh, P(EP_AXIS))
    self.cache = jax.device_put(jnp.broadcast_to(cache, (self.ranks, *cache.shape)), self._rows)
    graphdef = self.graphdef

    def local(state, cache, *step):
      out, cache = _local_step(graphdef, state, cache[0], *step, vocab_limit=vocab_limit, speculative=speculative,
                               moe_kwargs={"axis_name": EP_AXIS})
      return out, cache[None]

    self._write = _rank_writer(mesh)
    specs = state_specs(self.state, mesh)
    self._step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, *[P(EP_AXIS)] * (1 + len(StepInput._fields))),
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

  def run(self, rows: list[StepRow], *, batch: int, length: int, ranks: list[int] | None = None) -> StepResult:
    """Computes one step and returns what each row sampled (and drafted).

    Args:
      rows: per sequence, a `StepRow` (or a tuple of its leading fields).
      batch, length: the padded shape (`len(rows) <= batch`, every row's tokens `<= length`);
        with a mesh, `batch` rows per rank.
      ranks: with a mesh, the rank each row runs on (its pages are in that rank's cache).

    Returns:
      the rows' `StepResult`.
    """
    self.compiled_shapes.add((batch, length))
    rows = [StepRow(*row) for row in rows]
    if self.mesh is None:
      step = self.pad(rows, batch=batch, length=length)
      out, self.cache = self._step(self.state, self.cache, *[jnp.asarray(a) for a in step])
      return StepResult(*np.asarray(out)[:len(rows)].T)
    # `batch` rows per rank, in rank order; `ranks[i]` says where row i runs.
    order = [[i for i, rank in enumerate(ranks) if rank == r] for r in range(self.ranks)]
    parts = [self.pad([rows[i] for i in rows_of], batch=batch, length=length) for rows_of in order]
    step = [jax.device_put(np.concatenate(field), self._rows) for field in zip(*parts)]
    out, self.cache = self._step(self.state, self.cache, *step)
    out = np.asarray(out).reshape(self.ranks, batch, len(StepResult._fields))
    result = np.zeros((len(rows), len(StepResult._fields)), np.int32)
    for r, rows_of in enumerate(order):
      result[rows_of] = out[r, :len(rows_of)]
    return StepResult(*result.T)

  def pad(self, rows: list[StepRow], *, batch: int, length: int) -> StepInput:
    """The rows as one padded `StepInput` of `batch` rows of `length` tokens."""
    tokens = np.zeros((batch, length), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    table = np.full((batch, self.max_pages_per_seq), TRASH_PAGE, np.int32)
    last = np.zeros(batch, np.int32)
    known, next_token = np.ones(batch, np.int32), np.full(batch, -1, np.int32)
    temperature, top_k = np.zeros(batch, np.float32), np.zeros(batch, np.int32)
    top_p, seeds = np.ones(batch, np.float32), np.zeros(batch, np.uint32)
    for i, row in enumerate(rows):
      ids = row.tokens
      num_known = len(ids) if row.known is None else row.known
      if not 1 <= num_known <= len(ids) <= num_known + int(self.speculative):
        raise ValueError(f"row {i} has {len(ids)} tokens of which {num_known} known: at least one known, and at most "
                         f"{int(self.speculative)} draft")
      if num_known < len(ids) and length != _VERIFY_LENGTH:
        raise ValueError(f"row {i} has a draft: drafts are verified in steps of length {_VERIFY_LENGTH}, not {length}")
      tokens[i, :len(ids)] = ids
      positions[i] = row.start + np.arange(length)
      table[i, :len(row.pages)] = row.pages
      last[i], known[i], next_token[i] = len(ids) - 1, num_known, row.next_token
      temperature[i], top_k[i], top_p[i], seeds[i] = row.sampling
    if rows and positions.max() >= self.max_pages_per_seq * PAGE_SIZE:
      raise ValueError(f"position {positions.max()} is past the block table's {self.max_pages_per_seq} pages")
    return StepInput(tokens, positions, table, last, known, next_token, temperature, top_k, top_p, seeds)


def _local_step(graphdef, state, cache, tokens, positions, block_table, last, known, next_token, temperature, top_k,
                top_p, seeds, *, vocab_limit: int, speculative: bool, moe_kwargs=None):
  """One step on one device (or rank): `(out [b, 4] int32, the StepResult columns; cache)`."""
  model = nnx.merge(graphdef, state)
  b, length = tokens.shape
  rows = jnp.arange(b)
  hidden, cache = model.decode_hidden(tokens, positions, cache, block_table, moe_kwargs=moe_kwargs)

  def sample_after(index):  # `[b]` the token after each row's `index`-th token (the head only runs there)
    logits = model.logits(hidden[rows, index])
    return sample(logits, temperature, top_k, top_p, seeds, positions[rows, index] + 1, vocab_limit=vocab_limit)

  newest = known - 1
  first = sample_after(newest)
  if not speculative:
    none = jnp.zeros_like(first)
    return jnp.stack([first, none, none, none - 1], axis=1), cache
  draft_index = jnp.minimum(known, length - 1)
  if length == _VERIFY_LENGTH:  # a decode step: rows may be [newest, draft]
    second = sample_after(draft_index)
    accepted = (last >= known) & (first == tokens[rows, draft_index])
  else:  # a prefill step (chunks pad to 16 or more): no drafts, no second head and sort
    second, accepted = first, jnp.zeros_like(first, bool)
  # The MTP module's input at position i is the token at i + 1: the row's own tokens, then what
  # this step sampled (the row's known next token instead, for a prompt chunk that is not the last).
  index = jnp.arange(length)[None]
  shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  after_newest = jnp.where(next_token >= 0, next_token, first)
  following = jnp.where(index == newest[:, None], after_newest[:, None],
                        jnp.where(index == draft_index[:, None], second[:, None], shifted))
  mtp_hidden, cache = model.mtp_decode(hidden, following, positions, cache, block_table, moe_kwargs=moe_kwargs)
  drafted_from = newest + accepted  # the last position whose next token is now known
  logits = model.mtp_logits(mtp_hidden[rows, drafted_from])
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  draft = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy drafts, as DeepSeek's MTP serving
  return jnp.stack([first, accepted.astype(jnp.int32), second, draft], axis=1), cache


_step = functools.partial(jax.jit, static_argnums=(0,), static_argnames=("vocab_limit", "speculative"),
                          donate_argnums=(2,))(_local_step)


def _rank_writer(mesh):
  """A jitted `(cache, pages [ranks, n], values) -> cache` in which each rank writes `values`
  into its own row of `pages` (the other ranks' rows name their trash page)."""

  def local(cache, pages, values):
    # cache[0] first: indexing [0, :, pages] at once would put the pages' axis ahead of the layers'.
    return cache[0].at[:, pages[0]].set(jnp.moveaxis(values, 0, 1).astype(cache.dtype))[None]

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(EP_AXIS), P(EP_AXIS), P()), out_specs=P(EP_AXIS)),
                 donate_argnums=(0,))


@jax.jit
def _read_page(cache, page):
  return cache[:, page]


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_pages(cache, pages, values):
  return cache.at[:, pages].set(jnp.moveaxis(values, 0, 1))
