"""Pages of the paged latent cache: a free list, reference counts, and prefix hashing.

Each page holds 64 tokens (FlashMLA's page size). A page whose 64 tokens have all been computed
gets the hash of its tokens chained to the previous page's hash (`storage.kvcache.prefix_hashes`,
so the same keys name pages in the on-disk KV-cache store), and a later request whose prompt
starts with the same tokens shares the page instead of recomputing it. A freed page keeps its
hash until it is handed out again (least recently freed first), so a prompt seen recently hits
even after its first request finished. Page 0 is never handed out: the model runner points
padding at it.

With speculative decoding, a page also holds the MTP module's rows, and the row at its last
position was computed from the token after the page, which the page's hash does not cover. A
sequence sharing the page that differs exactly at that token drafts from the first sequence's
row there: a draft may be worse (measured: MTP logits off by up to 9 at the following
positions for such prompt pairs), while outputs are unaffected, since every token is verified.
"""

from __future__ import annotations

import collections

from serve.sequence import Sequence
from storage.kvcache import prefix_hashes

PAGE_SIZE = 64
TRASH_PAGE = 0  # padding rows write here; it belongs to no sequence


class BlockManager:
  """Hands out pages `1..num_pages-1` to sequences.

  Args:
    num_pages: pages in the device cache, the trash page included.
    root: the parent of every sequence's first page hash (`serve.model_fingerprint`), so pages of
      different models never share keys in a KV-cache store; None: the tokens alone.
    spill: optional `spill(page, key)`, called before a cached page is handed out again, while
      it still holds its tokens (the engine copies it to the on-disk KV-cache store).
    load: optional `load(keys, pages) -> n`: fills the fresh `pages` with the stored pages of
      the leading `keys` it has, returning how many (the engine reads them from the store).
      Called at admission for the full pages past the device's cached prefix.
  """

  def __init__(self, num_pages: int, *, root: bytes | None = None, spill=None, load=None):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is reserved for padding), got {num_pages}")
    self.num_pages = num_pages
    self.root = root
    self._free = collections.OrderedDict((page, None) for page in range(1, num_pages))  # least recently freed first
    self._refs = [0] * num_pages
    self._hash_of: list[bytes | None] = [None] * num_pages
    self._page_of: dict[bytes, int] = {}
    self._spill, self._load = spill, load
    self.hit_tokens = 0    # prompt tokens found in the prefix cache (device or store), since start
    self.store_hit_tokens = 0  # of those, read back from the KV-cache store
    self.query_tokens = 0  # prompt tokens looked up

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def usage(self) -> float:
    """Fraction of the usable pages held by sequences."""
    return 1.0 - len(self._free) / (self.num_pages - 1)

  @staticmethod
  def pages_for(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)

  def _hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
    """The prefix hashes of `seq`'s first `num_pages` pages, extended from those computed before
    (tokens are only ever appended, so earlier hashes stay valid)."""
    known = seq.page_hashes
    if len(known) < num_pages:
      parent = known[-1] if known else self.root
      known += prefix_hashes(seq.token_ids[len(known) * PAGE_SIZE:num_pages * PAGE_SIZE], PAGE_SIZE, parent)
    return known[:num_pages]

  def cached_prefix(self, seq: Sequence) -> list[int]:
    """The pages already holding the leading full pages of `seq`'s tokens (not its last token:
    the model must compute at least one token to have logits to sample from)."""
    pages = []
    for key in self._hashes(seq, (len(seq) - 1) // PAGE_SIZE):
      page = self._page_of.get(key)
      if page is None:
        break
      pages.append(page)
    return pages

  def can_allocate(self, seq: Sequence) -> bool:
    cached = self.cached_prefix(seq)
    revived = sum(1 for page in cached if self._refs[page] == 0)  # cached but free: taken off the free list
    return self.pages_for(len(seq)) - len(cached) + revived <= len(self._free)

  def allocate(self, seq: Sequence) -> None:
    """Gives `seq` pages for all its tokens, sharing the cached prefix; sets its computed count."""
    if seq.block_table:
      raise ValueError(f"{seq.request_id} already has pages")
    cached = self.cached_prefix(seq)
    for page in cached:
      if self._refs[page] == 0:
        del self._free[page]
      self._refs[page] += 1
    fresh = [self._take() for _ in range(self.pages_for(len(seq)) - len(cached))]
    loaded = 0
    if self._load is not None:  # full pages past the device's prefix may be in the store
      keys = self._hashes(seq, (len(seq) - 1) // PAGE_SIZE)[len(cached):]
      loaded = self._load(keys, fresh[:len(keys)]) if keys else 0
      for key, page in zip(keys[:loaded], fresh):
        if key not in self._page_of:
          self._hash_of[page], self._page_of[key] = key, page
      self.store_hit_tokens += loaded * PAGE_SIZE
    seq.block_table = cached + fresh
    seq.num_computed_tokens = (len(cached) + loaded) * PAGE_SIZE
    seq.num_hashed_pages = len(cached) + loaded
    if not seq.admitted:  # counted once: a preempted sequence's readmission is not a new prompt
      seq.admitted = True
      seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
      self.hit_tokens += seq.num_cached_tokens
      self.query_tokens += seq.num_prompt_tokens

  def _take(self) -> int:
    if not self._free:
      raise RuntimeError("no free page: check can_allocate / can_append first")
    page, _ = self._free.popitem(last=False)
    if self._hash_of[page] is not None:  # its cached contents are overwritten from now on
      if self._spill is not None:
        self._spill(page, self._hash_of[page])
      del self._page_of[self._hash_of[page]]
      self._hash_of[page] = None
    self._refs[page] = 1
    return page

  def can_append(self, seq: Sequence, num_tokens: int = 1) -> bool:
    return self.pages_for(len(seq) + num_tokens) - len(seq.block_table) <= len(self._free)

  def append(self, seq: Sequence, lookahead: int = 0) -> None:
    """Pages for `seq`'s tokens and `lookahead` more (a draft), before they are computed."""
    while len(seq.block_table) < self.pages_for(len(seq) + lookahead):
      seq.block_table.append(self._take())

  def computed(self, seq: Sequence) -> None:
    """Registers the hashes of `seq`'s pages that are now full and computed (so others share them)."""
    full = seq.num_computed_tokens // PAGE_SIZE
    if full <= seq.num_hashed_pages:  # nothing new filled up: most decode steps
      return
    for index, key in enumerate(self._hashes(seq, full)):
      page = seq.block_table[index]
      if self._hash_of[page] is None and key not in self._page_of:
        self._hash_of[page], self._page_of[key] = key, page
    seq.num_hashed_pages = full

  def free(self, seq: Sequence) -> None:
    """Returns `seq`'s pages; pages that reach no reference go to the free list's end, hash kept."""
    for page in reversed(seq.block_table):  # the tail first: the prefix stays cached longest
      self._refs[page] -= 1
      if self._refs[page] == 0:
        self._free[page] = None
    seq.block_table = []
    seq.num_hashed_pages = 0
