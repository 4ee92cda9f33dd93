"""Spilling cache pages to the on-disk KV-cache store without the scheduler waiting on storage.

A page leaving the device's prefix cache is copied to the host at once (its device page is about
to be reused), then written to the store by a background thread, which writes whatever has
queued up as one `put_many` (one index transaction for the batch). Until it is written, a page
stays in memory here and is served to lookups, so a page evicted and soon needed again comes
back without a round trip. The store is a cache: a spill that fails, or finds `max_pending`
pages already waiting, is dropped and counted, never retried or waited for.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
from absl import logging


class Spiller:
  """Writes `(key, page)` pairs to a `storage.kvcache.KVCacheStore` on a thread of its own.

  Args:
    store: the store (thread-safe).
    max_pending: the most pages waiting to be written (host memory: that many pages).

  Counters: `written` (stored by the store), `not_stored` (the store declined: already cached,
  being written by another, or no free slot), `dropped` (the queue was full, or closed),
  `failed` (the write raised).
  """

  def __init__(self, store, *, max_pending: int = 64):
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
      raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
    self._store = store
    self._max_pending = max_pending
    self._pending: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()  # oldest first
    self._cond = threading.Condition()
    self._closed = False
    self.written = self.not_stored = self.dropped = self.failed = 0
    self._thread = threading.Thread(target=self._run, name="fireflyer-kv-spill", daemon=True)
    self._thread.start()

  def put(self, key: bytes, page: np.ndarray) -> bool:
    """Queues `page` (`[page_bytes]` uint8, owned from now on) for `key`; False if dropped (queue full or closed)."""
    with self._cond:
      if key in self._pending:
        return True
      if self._closed or len(self._pending) >= self._max_pending:
        self.dropped += 1
        return False
      self._pending[key] = page
      self._cond.notify_all()
      return True

  def lookup(self, keys: list[bytes]) -> list[np.ndarray | None]:
    """The pages of `keys` still waiting to be written (None for the others)."""
    with self._cond:
      return [self._pending.get(key) for key in keys]

  def flush(self, timeout_s: float | None = None) -> bool:
    """Waits until every queued page is written (or dropped); False on timeout."""
    with self._cond:
      return self._cond.wait_for(lambda: not self._pending, timeout=timeout_s)

  def close(self, timeout_s: float | None = 30.0) -> None:
    """Refuses later puts, and waits up to `timeout_s` for the queue to drain and the thread to end
    (a slow store may keep it writing past that; it ends once the queue is empty)."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout=timeout_s)

  @property
  def num_pending(self) -> int:
    with self._cond:
      return len(self._pending)

  def _run(self) -> None:
    while True:
      with self._cond:
        self._cond.wait_for(lambda: self._pending or self._closed)
        if not self._pending:
          return  # closed and drained
        batch = list(self._pending.items())  # they stay visible to lookups until written
      keys = [key for key, _ in batch]
      try:
        stored = self._store.put_many(keys, np.stack([page for _, page in batch]))
      except Exception:  # noqa: BLE001 -- a cache: the pages are simply not kept
        logging.warning("KV-cache store: spilling %d pages failed; they are dropped", len(keys), exc_info=True)
        stored = None
      with self._cond:
        for key in keys:
          del self._pending[key]
        if stored is None:
          self.failed += len(keys)
        else:
          self.written += int(np.count_nonzero(stored))
          self.not_stored += len(keys) - int(np.count_nonzero(stored))
        self._cond.notify_all()
