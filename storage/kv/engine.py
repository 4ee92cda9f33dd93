"""The transactional KV seam, as 3FS's `IKVEngine` / `ITransaction`: every metadata byte goes through it.

Keys and values are bytes; keys sort bytewise. A transaction reads a consistent snapshot and
commits atomically, or raises `Conflict` because something it read changed after it began
(optimistic concurrency, as FoundationDB). `run_transaction` retries on conflict.

  with engine.read_write() as txn:        # commits on leaving the block, cancels on an exception
    value = txn.get(b"INOD...")
    txn.set(b"INOD...", new_value)
"""

from __future__ import annotations

import abc
import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class KVError(RuntimeError):
  """A KV backend failed."""


class Conflict(KVError):
  """Something the transaction read was changed by another transaction that committed first."""


class ReadOnlyError(KVError):
  """A write was attempted in a read-only transaction."""


class Transaction(abc.ABC):
  """One transaction; not thread-safe. Reads see the state at `begin` plus this transaction's own writes."""

  def __init__(self, read_only: bool):
    self.read_only = read_only
    self._writes: dict[bytes, bytes | None] = {}  # None = cleared
    self._done = False

  # -- reads --
  def get(self, key: bytes) -> bytes | None:
    """The value of `key`, or None."""
    self._check_open()
    key = _as_key(key)
    if key in self._writes:
      return self._writes[key]
    return self._read(key)

  def get_range(self, begin: bytes, end: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
    """Key-value pairs with `begin <= key < end`, in key order, at most `limit` of them."""
    self._check_open()
    begin, end = _as_key(begin), _as_key(end)
    if limit is not None and limit < 0:
      raise ValueError(f"limit must be >= 0 or None, got {limit}")
    local = {key: value for key, value in self._writes.items() if begin <= key < end}
    # This transaction's own clears may hide stored keys: fetch that many more than `limit`.
    fetch = None if limit is None else limit + sum(value is None for value in local.values())
    stored = dict(self._read_range(begin, end, fetch))
    stored.update(local)
    pairs = sorted((k, v) for k, v in stored.items() if v is not None)
    if limit is not None:
      pairs = pairs[:limit]
    return pairs

  # -- writes --
  def set(self, key: bytes, value: bytes) -> None:
    self._check_writable()
    if not isinstance(value, (bytes, bytearray, memoryview)):
      raise TypeError(f"value must be bytes, got {type(value).__name__}")
    self._writes[_as_key(key)] = bytes(value)

  def clear(self, key: bytes) -> None:
    self._check_writable()
    self._writes[_as_key(key)] = None

  # -- end --
  def commit(self) -> None:
    """Applies the writes atomically; raises `Conflict` if a read went stale."""
    self._check_open()
    self._done = True
    if self._writes:
      self._commit(self._writes)
    else:
      self._release()

  def cancel(self) -> None:
    if not self._done:
      self._done = True
      self._release()

  def __enter__(self) -> "Transaction":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None and not self._done:
      self.commit()
    else:
      self.cancel()

  def _check_open(self) -> None:
    if self._done:
      raise KVError("the transaction has already committed or been cancelled")

  def _check_writable(self) -> None:
    self._check_open()
    if self.read_only:
      raise ReadOnlyError("cannot write in a read-only transaction")

  # -- backend --
  @abc.abstractmethod
  def _read(self, key: bytes) -> bytes | None: ...

  @abc.abstractmethod
  def _read_range(self, begin: bytes, end: bytes, limit: int | None) -> list[tuple[bytes, bytes]]: ...

  @abc.abstractmethod
  def _commit(self, writes: dict[bytes, bytes | None]) -> None: ...

  def _release(self) -> None:
    """Frees backend resources of a transaction that wrote nothing."""


class KVEngine(abc.ABC):
  """A transactional ordered KV store."""

  # The most keys one read-write transaction may read, and the most it may write (each bound on
  # its own, as etcd's --max-txn-ops); callers split larger batches. None: unlimited.
  max_ops_per_transaction: int | None = None

  @abc.abstractmethod
  def read_only(self) -> Transaction: ...

  @abc.abstractmethod
  def read_write(self) -> Transaction: ...

  def close(self) -> None:
    """Releases the backend."""


def _as_key(key) -> bytes:
  if not isinstance(key, (bytes, bytearray, memoryview)):
    raise TypeError(f"keys must be bytes, got {type(key).__name__}")
  return bytes(key)


def run_transaction(engine: KVEngine, body: Callable[[Transaction], T], *, read_only: bool = False,
                    max_attempts: int = 50, backoff_s: float = 0.001) -> T:
  """Runs `body(txn)` in a fresh transaction and commits, retrying on `Conflict` with jittered backoff.

  `body` must be safe to run again (it sees fresh reads each attempt). Raises the last `Conflict`
  after `max_attempts`.
  """
  for attempt in range(max_attempts):
    txn = engine.read_only() if read_only else engine.read_write()
    try:
      result = body(txn)
      txn.commit()
      return result
    except Conflict:
      txn.cancel()
      if attempt == max_attempts - 1:
        raise
      time.sleep(backoff_s * (2 ** min(attempt, 8)) * random.random())
    except BaseException:
      txn.cancel()
      raise
  raise AssertionError("unreachable")
