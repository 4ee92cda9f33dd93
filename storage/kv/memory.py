"""An in-memory KV engine for tests: serializable transactions by optimistic validation."""

from __future__ import annotations

import threading

from storage.kv.engine import Conflict, KVEngine, Transaction


class MemoryKV(KVEngine):
  """Process-local and thread-safe. Each key remembers the version that last changed it (deletes
  included), so a transaction can tell whether anything it read changed after it began."""

  def __init__(self):
    self._lock = threading.Lock()
    self._data: dict[bytes, bytes] = {}
    self._changed_at: dict[bytes, int] = {}
    self._version = 0

  def read_only(self) -> Transaction:
    return _MemoryTransaction(self, read_only=True)

  def read_write(self) -> Transaction:
    return _MemoryTransaction(self, read_only=False)


class _MemoryTransaction(Transaction):
  def __init__(self, engine: MemoryKV, read_only: bool):
    super().__init__(read_only)
    self._engine = engine
    with engine._lock:
      self._start = engine._version
    self._read_keys: set[bytes] = set()
    self._read_ranges: list[tuple[bytes, bytes]] = []

  def _stale_key(self, key: bytes) -> bool:
    return self._engine._changed_at.get(key, 0) > self._start

  def _stale_range(self, begin: bytes, end: bytes) -> bool:
    return any(begin <= k < end and v > self._start for k, v in self._engine._changed_at.items())

  # Reads see the latest state; one that changed after `start` is a conflict at once, so even a
  # read-only transaction only ever observes a single snapshot.
  def _read(self, key: bytes) -> bytes | None:
    with self._engine._lock:
      if self._stale_key(key):
        raise Conflict(f"{key!r} changed after this transaction began")
      self._read_keys.add(key)
      return self._engine._data.get(key)

  def _read_range(self, begin: bytes, end: bytes, limit: int | None) -> list[tuple[bytes, bytes]]:
    with self._engine._lock:
      if self._stale_range(begin, end):
        raise Conflict(f"the range [{begin!r}, {end!r}) changed after this transaction began")
      self._read_ranges.append((begin, end))
      pairs = sorted((k, v) for k, v in self._engine._data.items() if begin <= k < end)
      return pairs if limit is None else pairs[:limit]

  def _commit(self, writes: dict[bytes, bytes | None]) -> None:
    engine = self._engine
    with engine._lock:
      if any(self._stale_key(k) for k in self._read_keys) or any(self._stale_range(b, e) for b, e in self._read_ranges):
        raise Conflict("a key this transaction read changed before it committed")
      engine._version += 1
      for key, value in writes.items():
        if value is None:
          engine._data.pop(key, None)
        else:
          engine._data[key] = value
        engine._changed_at[key] = engine._version
