"""`serve.kv_spill.Spiller`: writes in the background, serves pages until written, drops (never blocks) when full or failing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serve.kv_spill import Spiller


class GatedStore:
  """A store whose writes wait for `open` (a slow cluster), fail for a batch holding a key in
  `broken`, and decline keys in `declined` (as an already cached key)."""

  def __init__(self):
    self.open = threading.Event()
    self.entered = threading.Event()  # a write has started
    self.pages: dict[bytes, bytes] = {}
    self.broken: set[bytes] = set()
    self.declined: set[bytes] = set()
    self.batches: list[list[bytes]] = []

  def put_many(self, keys, pages):
    self.entered.set()
    self.open.wait(timeout=60)
    self.batches.append(list(keys))
    if self.broken & set(keys):
      raise OSError("simulated: the write failed")
    stored = np.array([key not in self.declined for key in keys])
    self.pages.update((key, page.tobytes()) for key, page, ok in zip(keys, pages, stored) if ok)
    return stored


def _page(i: int) -> np.ndarray:
  return np.full(16, i, np.uint8)


def test_queued_pages_are_served_until_written_then_land_in_the_store():
  store = GatedStore()
  spiller = Spiller(store, max_pending=4)
  try:
    assert spiller.put(b"a", _page(1)) and spiller.put(b"b", _page(2))
    assert spiller.put(b"a", _page(9))  # already queued: kept as it was
    got = spiller.lookup([b"b", b"x", b"a"])
    assert got[1] is None and (got[0] == 2).all() and (got[2] == 1).all()
    assert not spiller.flush(timeout_s=0.05) and store.pages == {}  # the store is slow: nothing written yet
    assert store.entered.wait(timeout=30)
    assert spiller.put(b"c", _page(3)) and spiller.put(b"d", _page(4))  # queued behind the write in progress
    store.declined.add(b"d")
    store.open.set()
    assert spiller.flush(timeout_s=30)
    assert store.pages == {b"a": _page(1).tobytes(), b"b": _page(2).tobytes(), b"c": _page(3).tobytes()}
    # What queued during the first write went as one batch (b too, if the first write took only a).
    assert len(store.batches) == 2 and store.batches[1][-2:] == [b"c", b"d"]
    assert spiller.lookup([b"a", b"b", b"c", b"d"]) == [None] * 4
    assert (spiller.written, spiller.not_stored) == (3, 1)
  finally:
    store.open.set()
    spiller.close()


def test_a_full_queue_drops_instead_of_blocking_and_failures_are_counted():
  store = GatedStore()
  store.broken.add(b"bad")
  spiller = Spiller(store, max_pending=2)
  try:
    assert spiller.put(b"bad", _page(1))
    assert store.entered.wait(timeout=30)  # "bad" is being written, alone
    assert spiller.put(b"b", _page(2))
    assert not spiller.put(b"c", _page(3)) and spiller.dropped == 1  # full: dropped at once
    store.open.set()
    assert spiller.flush(timeout_s=30)
    assert spiller.failed == 1 and spiller.written == 1 and set(store.pages) == {b"b"}
  finally:
    store.open.set()
    spiller.close()
  assert not spiller.put(b"d", _page(4))  # closed


def test_max_pending_must_be_positive():
  with pytest.raises(ValueError, match="max_pending"):
    Spiller(GatedStore(), max_pending=0)
