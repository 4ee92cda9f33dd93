"""`serve.kv_spill.Spiller`: writes in the background, serves pages until written, drops (never blocks) when full or failing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serve.kv_spill import Spiller


class GatedStore:
  """A store whose puts wait for `open` (a slow cluster), and fail for keys in `broken`."""

  def __init__(self):
    self.open = threading.Event()
    self.pages: dict[bytes, bytes] = {}
    self.broken: set[bytes] = set()

  def put(self, key, page):
    self.open.wait(timeout=60)
    if key in self.broken:
      raise OSError("simulated: the write failed")
    self.pages[key] = page.tobytes()
    return True


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
    store.open.set()
    assert spiller.flush(timeout_s=30)
    assert store.pages == {b"a": _page(1).tobytes(), b"b": _page(2).tobytes()}
    assert spiller.lookup([b"a", b"b"]) == [None, None] and spiller.written == 2
  finally:
    store.open.set()
    spiller.close()


def test_a_full_queue_drops_instead_of_blocking_and_failures_are_counted():
  store = GatedStore()
  store.broken.add(b"bad")
  spiller = Spiller(store, max_pending=2)
  try:
    assert spiller.put(b"bad", _page(1)) and spiller.put(b"b", _page(2))
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
