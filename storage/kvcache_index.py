"""The KV-cache store's index (`storage.kvcache`): which slot of the data files holds which page.

It lives in a transactional KV (`storage.kv`), so every process sharing that KV sees one index.
Keys under `prefix` (integers big-endian, so ranges sort by number):

  C                      -> config {page_bytes, capacity_pages, num_files, pending_timeout_s}
  N                      -> the next never-used slot: slots below it have been handed out
  F <slot:4>             -> b"": a free slot (from a delete, a clear or a damaged page)
  K <key>                -> [slot, nonce, ready, stamp_ns]: ready 0 = pending (being written)
  L <stamp:8> <slot:4>   -> ready byte + key: every slot in use, least recently used first; a
                            pending record whose key no longer points at it is quarantined
  E <instance:16>        -> [evictions, reclaimed]: one record per store instance, so that
                            counting never makes two writers conflict

A slot is handed out pending (`allocate`) and becomes visible only when `confirm` finds the
same entry (same nonce) still there, so a reader never sees a page being written. A pending
entry older than `pending_timeout_s` is a crashed writer's: `allocate` recycles it ("reclaimed").
When no slot is free the least recently used ready page is evicted. Removing a pending entry
(`delete`, `release`) drops its key but keeps its pending L record with the original stamp: its
writer may still be writing, so the slot is quarantined and recycled only after the timeout.

Cost model: a lookup is one read-only transaction; `allocate`, `confirm`, `touch` and `delete`
are one read-write transaction each for a whole batch (with SqliteKV: one write lock and one
fsync), or one per sub-batch on an engine that caps a transaction's operations
(`KVEngine.max_ops_per_transaction`, 128 with EtcdKV); sub-batches commit one by one. To keep
writers from conflicting with every reader, candidates are found first in a read-only snapshot
and then checked key by key in the read-write transaction (a range read there would conflict
with any touch anywhere); the snapshot looks past young pending records, however many, so a
key is refused a slot only when none is takeable. Stamps are wall-clock nanoseconds, so LRU
order across hosts is only as good as their clocks.
"""

from __future__ import annotations

import os
import random
import struct
import time
from typing import NamedTuple, Sequence

import msgpack

from storage.kv import Conflict, KVEngine, KVError, Transaction, run_transaction

_ATTEMPTS = 50  # read-write attempts of one allocation before `Conflict` reaches the caller
_TOUCH_ATTEMPTS = 3  # LRU stamps are advice: after a few conflicts a touch is dropped
# Worst-case reads (and, each bound alone, writes) per key of a read-write transaction, to size
# sub-batches for engines with `max_ops_per_transaction`. Allocating n keys reads n entries, up
# to a window of 2n + 8 free slots and as many LRU records (two reads each), N and E: 7n + 26.
_ALLOCATE_OPS, _ALLOCATE_FIXED_OPS = 7, 26
_KEY_OPS = 3  # confirm, touch, delete: one read, up to three writes per key


class Entry(NamedTuple):
  slot: int
  nonce: int  # random per allocation: tells this write of the slot from every other one
  ready: bool
  stamp: int  # ns: allocation time while pending, last use once ready


def _pack(entry: Entry) -> bytes:
  return msgpack.packb([entry.slot, entry.nonce, int(entry.ready), entry.stamp])


def _unpack(raw: bytes) -> Entry:
  slot, nonce, ready, stamp = msgpack.unpackb(raw)
  return Entry(slot, nonce, bool(ready), stamp)


class _Retry(Exception):
  """An allocation found its snapshot's candidates gone and is short of slots: plan again."""


class Index:
  """The index of one store: `prefix` separates it from other stores in the same KV."""

  def __init__(self, engine: KVEngine, prefix: bytes):
    self.engine, self.prefix = engine, prefix

  # -- keys --
  def _k(self, key: bytes) -> bytes:
    return self.prefix + b"K" + key

  def _l(self, entry: Entry) -> bytes:
    return self.prefix + b"L" + struct.pack(">QI", entry.stamp, entry.slot)

  def _f(self, slot: int) -> bytes:
    return self.prefix + b"F" + struct.pack(">I", slot)

  def _range(self, section: bytes) -> tuple[bytes, bytes]:
    return self.prefix + section, self.prefix + bytes([section[0] + 1])

  def _batches(self, items: Sequence, ops_per_item: int, fixed_ops: int = 0) -> list[Sequence]:
    """`items` split so that one read-write transaction per part stays within the engine's cap."""
    limit = self.engine.max_ops_per_transaction
    size = len(items) if limit is None else max(1, (limit - fixed_ops) // ops_per_item)
    return [items[i:i + size] for i in range(0, len(items), max(size, 1))]

  # -- config --
  def init(self, config: dict) -> dict:
    """Stores `config` if the store is new; returns the stored one (the caller compares)."""
    def body(txn: Transaction) -> dict:
      raw = txn.get(self.prefix + b"C")
      if raw is not None:
        return msgpack.unpackb(raw)
      txn.set(self.prefix + b"C", msgpack.packb(config))
      return config
    return run_transaction(self.engine, body)

  def config(self) -> dict | None:
    raw = run_transaction(self.engine, lambda txn: txn.get(self.prefix + b"C"), read_only=True)
    return None if raw is None else msgpack.unpackb(raw)

  # -- reads --
  def lookup(self, keys: Sequence[bytes]) -> list[Entry | None]:
    """The ready entry of each key, or None; one snapshot."""
    def body(txn: Transaction) -> list[Entry | None]:
      out = []
      for key in keys:
        raw = txn.get(self._k(key))
        entry = None if raw is None else _unpack(raw)
        out.append(entry if entry is not None and entry.ready else None)
      return out
    return run_transaction(self.engine, body, read_only=True)

  def leading_ready(self, keys: Sequence[bytes]) -> int:
    """How many of `keys`, from the first, are ready: the scan stops at the first miss."""
    def body(txn: Transaction) -> int:
      for count, key in enumerate(keys):
        raw = txn.get(self._k(key))
        if raw is None or not _unpack(raw).ready:
          return count
      return len(keys)
    return run_transaction(self.engine, body, read_only=True)

  def usage(self) -> tuple[int, int, int]:
    """(slots in use, ready or pending; evictions; reclaimed pending slots) over all instances."""
    def body(txn: Transaction) -> tuple[int, int, int]:
      raw = txn.get(self.prefix + b"N")
      handed_out = 0 if raw is None else struct.unpack(">Q", raw)[0]
      free = len(txn.get_range(*self._range(b"F")))
      counts = [msgpack.unpackb(v) for _, v in txn.get_range(*self._range(b"E"))]
      return handed_out - free, sum(c[0] for c in counts), sum(c[1] for c in counts)
    return run_transaction(self.engine, body, read_only=True)

  def keys(self, limit: int) -> list[bytes]:
    """Up to `limit` keys with an entry (ready or pending), in key order."""
    skip = len(self.prefix) + 1
    pairs = run_transaction(self.engine, lambda txn: txn.get_range(*self._range(b"K"), limit=limit),
                            read_only=True)
    return [k[skip:] for k, _ in pairs]

  # -- writes --
  def allocate(self, keys: Sequence[bytes], *, capacity: int, pending_timeout_s: float,
               instance: bytes) -> list[Entry | None]:
    """Pending entries for `keys` (distinct), one transaction per sub-batch; None where a key is
    not taken: it is ready already, another writer holds it pending, or no slot could be found
    (every slot pending and young, or a page of this batch). Raises `Conflict` after `_ATTEMPTS`
    lost races (sub-batches allocated before then are released)."""
    out: list[Entry | None] = []
    batch = frozenset(keys)
    for part in self._batches(keys, _ALLOCATE_OPS, _ALLOCATE_FIXED_OPS):
      try:
        out += self._allocate_part(part, batch, capacity=capacity, pending_timeout_s=pending_timeout_s,
                                   instance=instance)
      except BaseException:
        taken = [(k, e) for k, e in zip(keys, out) if e is not None]
        if taken:
          self.release(*zip(*taken))
        raise
    return out

  def _allocate_part(self, keys, batch, *, capacity, pending_timeout_s, instance) -> list[Entry | None]:
    for attempt in range(_ATTEMPTS):
      free, lru = self._candidates(len(keys), batch, shuffle=attempt > 0, pending_timeout_s=pending_timeout_s)
      try:
        with self.engine.read_write() as txn:
          return self._allocate_in(txn, keys, batch, free, lru, capacity=capacity,
                                   pending_timeout_s=pending_timeout_s, instance=instance,
                                   last=attempt == _ATTEMPTS - 1)
      except (Conflict, _Retry):
        if attempt == _ATTEMPTS - 1:
          raise Conflict("could not allocate KV-cache slots: too many concurrent writers") from None
        time.sleep(0.001 * (2 ** min(attempt, 6)) * random.random())
    raise AssertionError("unreachable")

  def _candidates(self, wanted: int, batch: frozenset, *, shuffle: bool, pending_timeout_s: float):
    """Free slots and the least recently used takeable slots (ready, or pending past the
    timeout), from a read-only snapshot: the read-write transaction re-checks each one it takes
    with point reads. Young pending records and pages of `batch` are skipped, however many."""
    stale_before = time.time_ns() - int(pending_timeout_s * 1e9)
    window = 2 * wanted + 8
    def takeable(pairs):
      for k, v in pairs:
        stamp, slot = struct.unpack(">QI", k[-12:])
        if (v[0] or stamp <= stale_before) and v[1:] not in batch:  # a young pending slot is being written
          yield Entry(slot, 0, bool(v[0]), stamp), v[1:]
    def body(txn: Transaction):
      free = [struct.unpack(">I", k[-4:])[0] for k, _ in txn.get_range(*self._range(b"F"), limit=window)]
      begin, end = self._range(b"L")
      oldest = txn.get_range(begin, end, limit=window)
      lru = list(takeable(oldest))
      if len(lru) < window and len(oldest) == window:  # the oldest are mostly young pending: look past them
        lru += takeable(txn.get_range(oldest[-1][0] + b"\0", end))
      return free, lru[:window]
    free, lru = run_transaction(self.engine, body, read_only=True)
    if shuffle:  # after a lost race, spread concurrent writers over the oldest few (LRU, roughly)
      random.shuffle(free)
      random.shuffle(lru)
    return free, lru

  def _allocate_in(self, txn: Transaction, keys, batch, free, lru, *, capacity, pending_timeout_s, instance, last):
    now = time.time_ns()
    stale_before = now - int(pending_timeout_s * 1e9)
    out: list[Entry | None] = [None] * len(keys)
    need: list[int] = []
    reclaimed = evicted = 0
    for i, key in enumerate(keys):
      raw = txn.get(self._k(key))
      if raw is None:
        need.append(i)
        continue
      entry = _unpack(raw)
      if entry.ready or entry.stamp > stale_before:
        continue  # cached already, or another writer is on it
      txn.clear(self._l(entry))  # this key's own crashed writer: take its slot over
      out[i] = self._claim(txn, key, entry.slot, now)
      reclaimed += 1
    slots: list[int] = []
    missed = False
    for slot in free:
      if len(slots) == len(need):
        break
      if txn.get(self._f(slot)) is None:
        missed = True
        continue
      txn.clear(self._f(slot))
      slots.append(slot)
    if len(slots) < len(need):
      raw = txn.get(self.prefix + b"N")
      handed_out = 0 if raw is None else struct.unpack(">Q", raw)[0]
      fresh = min(len(need) - len(slots), capacity - handed_out)
      if fresh > 0:
        slots += range(handed_out, handed_out + fresh)
        txn.set(self.prefix + b"N", struct.pack(">Q", handed_out + fresh))
    for candidate, victim in lru:
      if len(slots) == len(need):
        break
      if victim in batch:
        continue  # a page of this very batch that is cached already stays
      lkey = self._l(candidate)
      record = txn.get(lkey)
      if record is None:
        missed = True  # used, evicted or recycled since the snapshot
        continue
      raw = txn.get(self._k(victim))
      entry = None if raw is None else _unpack(raw)
      owned = entry is not None and entry.slot == candidate.slot and entry.stamp == candidate.stamp
      if record[0] and not owned:
        missed = True
        continue
      if not record[0]:
        if candidate.stamp > stale_before:
          continue  # still being written
        if not owned and entry is not None and entry.slot == candidate.slot:
          continue  # not a quarantined record after all: leave the slot to its entry
      txn.clear(lkey)
      if owned:  # a ready page evicted, or a crashed writer's entry reclaimed
        txn.clear(self._k(victim))
        evicted += entry.ready
        reclaimed += not entry.ready
      # else a removed write's quarantine is over: only its record held the slot
      slots.append(candidate.slot)
    if len(slots) < len(need) and missed and not last:
      raise _Retry()  # leaving the block cancels the transaction
    for i, slot in zip(need, slots):
      out[i] = self._claim(txn, keys[i], slot, now)
    if evicted or reclaimed:
      ekey = self.prefix + b"E" + instance
      raw = txn.get(ekey)
      before = [0, 0] if raw is None else msgpack.unpackb(raw)
      txn.set(ekey, msgpack.packb([before[0] + evicted, before[1] + reclaimed]))
    return out

  def _claim(self, txn: Transaction, key: bytes, slot: int, now: int) -> Entry:
    entry = Entry(slot, int.from_bytes(os.urandom(8), "little") >> 1, False, now)
    txn.set(self._k(key), _pack(entry))
    txn.set(self._l(entry), b"\0" + key)
    return entry

  def confirm(self, keys: Sequence[bytes], entries: Sequence[Entry]) -> list[bool]:
    """Makes each pending entry ready, if it is still this allocation's (same nonce): one
    reclaimed as stale or deleted meanwhile is not, and its page is dropped."""
    def body(txn: Transaction, part) -> list[bool]:
      now, done = time.time_ns(), []
      for key, entry in part:
        if txn.get(self._k(key)) != _pack(entry):
          done.append(False)
          continue
        self._restamp(txn, key, entry, entry._replace(ready=True, stamp=now))
        done.append(True)
      return done
    return [done for part in self._batches(list(zip(keys, entries)), _KEY_OPS)
            for done in run_transaction(self.engine, lambda txn: body(txn, part))]

  def _restamp(self, txn: Transaction, key: bytes, old: Entry, new: Entry) -> None:
    txn.clear(self._l(old))
    txn.set(self._l(new), bytes([new.ready]) + key)
    txn.set(self._k(key), _pack(new))

  def touch(self, keys: Sequence[bytes], entries: Sequence[Entry], *, drop: Sequence[bool]) -> int:
    """Stamps each unchanged entry as just used, or removes it where `drop` (a damaged page).

    Best effort, never raises a `KVError`: a (sub-)batch that loses `_TOUCH_ATTEMPTS` races or
    fails in the engine (e.g. SQLite busy past its `busy_timeout_s`) is dropped. Returns how
    many entries it removed.
    """
    def body(txn: Transaction, part) -> int:
      now, removed = time.time_ns(), 0
      for key, entry, bad in part:
        if txn.get(self._k(key)) != _pack(entry):
          continue  # evicted or replaced since it was read: nothing of ours to stamp
        if bad:
          self._remove(txn, key, entry)
          removed += 1
        else:
          self._restamp(txn, key, entry, entry._replace(stamp=now))
      return removed
    removed = 0
    for part in self._batches(list(zip(keys, entries, drop)), _KEY_OPS):
      try:
        removed += run_transaction(self.engine, lambda txn: body(txn, part), max_attempts=_TOUCH_ATTEMPTS)
      except KVError:
        pass  # LRU stamps are advice; an unremoved damaged page is dropped by a later read
    return removed

  def _remove(self, txn: Transaction, key: bytes, entry: Entry) -> None:
    txn.clear(self._k(key))
    if entry.ready:
      txn.clear(self._l(entry))
      txn.set(self._f(entry.slot), b"")
    # A pending entry's writer may still be writing the slot: its L record stays, pending with the
    # original stamp, so `allocate` recycles the slot only after the timeout (quarantine).

  def release(self, keys: Sequence[bytes], entries: Sequence[Entry]) -> None:
    """Gives up allocations whose write failed (those still unchanged): their slots are
    quarantined, as some of the write may still land, and recycled after the timeout. Best
    effort, like `touch`: a pending entry it misses is recycled after the timeout anyway."""
    self.touch(keys, entries, drop=[True] * len(keys))

  def delete(self, keys: Sequence[bytes]) -> int:
    """Removes each key's entry, ready or pending (its writer's confirm then fails, and the slot is
    quarantined until the timeout); returns how many."""
    def body(txn: Transaction, part) -> int:
      count = 0
      for key in part:
        raw = txn.get(self._k(key))
        if raw is not None:
          self._remove(txn, key, _unpack(raw))
          count += 1
      return count
    return sum(run_transaction(self.engine, lambda txn: body(txn, part))
               for part in self._batches(list(keys), _KEY_OPS))
