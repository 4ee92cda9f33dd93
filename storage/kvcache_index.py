"""The KV-cache store's index (`storage.kvcache`): which slot of the data files holds which page.

It lives in a transactional KV (`storage.kv`), so every process sharing that KV sees one index.
Keys under `prefix` (integers big-endian, so ranges sort by number):

  C                      -> config {page_bytes, capacity_pages, num_files}
  N                      -> the next never-used slot: slots below it have been handed out
  F <slot:4>             -> b"": a free slot (from a delete, a clear or a damaged page)
  K <key>                -> [slot, nonce, ready, stamp_ns]: ready 0 = pending (being written)
  L <stamp:8> <slot:4>   -> ready byte + key: every slot in use, least recently used first
  E <instance:16>        -> [evictions, reclaimed]: one record per store instance, so that
                            counting never makes two writers conflict

A slot is handed out pending (`allocate`) and becomes visible only when `confirm` finds the
same entry (same nonce) still there, so a reader never sees a page being written. A pending
entry older than `pending_timeout_s` is a crashed writer's: `allocate` recycles it ("reclaimed").
When no slot is free the least recently used ready page is evicted.

Cost model: a lookup is one read-only transaction; `allocate`, `confirm`, `touch` and `delete`
are one read-write transaction each for a whole batch (with SqliteKV: one write lock and one
fsync). To keep writers from conflicting with every reader, candidates are found first in a
read-only snapshot and then checked key by key in the read-write transaction (a range read
there would conflict with any touch anywhere). Stamps are wall-clock nanoseconds, so LRU order
across hosts is only as good as their clocks.
"""

from __future__ import annotations

import os
import random
import struct
import time
from typing import NamedTuple, Sequence

import msgpack

from storage.kv import Conflict, KVEngine, Transaction, run_transaction

_ATTEMPTS = 50  # read-write attempts of one allocation before `Conflict` reaches the caller
_TOUCH_ATTEMPTS = 3  # LRU stamps are advice: after a few conflicts a touch is dropped


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
    """Pending entries for `keys` (distinct), in one transaction; None where a key is not taken:
    it is ready already, another writer holds it pending, or no slot could be found (every slot
    pending and young). Raises `Conflict` after `_ATTEMPTS` lost races."""
    for attempt in range(_ATTEMPTS):
      free, lru = self._candidates(len(keys), shuffle=attempt > 0, pending_timeout_s=pending_timeout_s)
      try:
        with self.engine.read_write() as txn:
          return self._allocate_in(txn, keys, free, lru, capacity=capacity, pending_timeout_s=pending_timeout_s,
                                   instance=instance, last=attempt == _ATTEMPTS - 1)
      except (Conflict, _Retry):
        if attempt == _ATTEMPTS - 1:
          raise Conflict("could not allocate KV-cache slots: too many concurrent writers") from None
        time.sleep(0.001 * (2 ** min(attempt, 6)) * random.random())
    raise AssertionError("unreachable")

  def _candidates(self, wanted: int, *, shuffle: bool, pending_timeout_s: float):
    """Free slots and the least recently used slots, from a read-only snapshot: the read-write
    transaction re-checks each one it takes with point reads."""
    stale_before = time.time_ns() - int(pending_timeout_s * 1e9)
    window = 2 * wanted + 8
    def body(txn: Transaction):
      free = [struct.unpack(">I", k[-4:])[0] for k, _ in txn.get_range(*self._range(b"F"), limit=window)]
      lru = []
      for k, v in txn.get_range(*self._range(b"L"), limit=window):
        stamp, slot = struct.unpack(">QI", k[-12:])
        if v[0] or stamp <= stale_before:  # a young pending slot is still being written: never taken
          lru.append((Entry(slot, 0, bool(v[0]), stamp), v[1:]))
      return free, lru
    free, lru = run_transaction(self.engine, body, read_only=True)
    if shuffle:  # after a lost race, spread concurrent writers over the oldest few (LRU, roughly)
      random.shuffle(free)
      random.shuffle(lru)
    return free, lru

  def _allocate_in(self, txn: Transaction, keys, free, lru, *, capacity, pending_timeout_s, instance, last):
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
    batch = set(keys)
    for candidate, victim in lru:
      if len(slots) == len(need):
        break
      if victim in batch:
        continue  # a page of this very batch that is cached already stays
      lkey = self._l(candidate)
      raw = txn.get(self._k(victim))
      entry = None if raw is None else _unpack(raw)
      if entry is None or txn.get(lkey) is None or entry.slot != candidate.slot or entry.stamp != candidate.stamp:
        missed = True  # used, evicted or deleted since the snapshot
        continue
      if not entry.ready and entry.stamp > stale_before:
        continue
      txn.clear(lkey)
      txn.clear(self._k(victim))
      slots.append(entry.slot)
      evicted += entry.ready
      reclaimed += not entry.ready
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
    def body(txn: Transaction) -> list[bool]:
      now, done = time.time_ns(), []
      for key, entry in zip(keys, entries):
        if txn.get(self._k(key)) != _pack(entry):
          done.append(False)
          continue
        self._restamp(txn, key, entry, entry._replace(ready=True, stamp=now))
        done.append(True)
      return done
    return run_transaction(self.engine, body)

  def _restamp(self, txn: Transaction, key: bytes, old: Entry, new: Entry) -> None:
    txn.clear(self._l(old))
    txn.set(self._l(new), bytes([new.ready]) + key)
    txn.set(self._k(key), _pack(new))

  def touch(self, keys: Sequence[bytes], entries: Sequence[Entry], *, drop: Sequence[bool]) -> int | None:
    """Stamps each unchanged entry as just used, or removes it where `drop` (a damaged page).
    Best effort: returns how many it removed, or None when it lost too many races and gave up."""
    def body(txn: Transaction) -> int:
      now, removed = time.time_ns(), 0
      for key, entry, bad in zip(keys, entries, drop):
        if txn.get(self._k(key)) != _pack(entry):
          continue  # evicted or replaced since it was read: nothing of ours to stamp
        if bad:
          self._remove(txn, key, entry)
          removed += 1
        else:
          self._restamp(txn, key, entry, entry._replace(stamp=now))
      return removed
    try:
      return run_transaction(self.engine, body, max_attempts=_TOUCH_ATTEMPTS)
    except Conflict:
      return None

  def _remove(self, txn: Transaction, key: bytes, entry: Entry) -> None:
    txn.clear(self._k(key))
    txn.clear(self._l(entry))
    txn.set(self._f(entry.slot), b"")

  def release(self, keys: Sequence[bytes], entries: Sequence[Entry]) -> None:
    """Frees the slots of allocations whose write failed (those still unchanged; if this loses
    its races, the pending entries are recycled after the timeout instead)."""
    self.touch(keys, entries, drop=[True] * len(keys))

  def delete(self, keys: Sequence[bytes]) -> int:
    """Removes each key's entry, ready or pending (its writer's confirm then fails); returns how many."""
    def body(txn: Transaction) -> int:
      count = 0
      for key in keys:
        raw = txn.get(self._k(key))
        if raw is not None:
          self._remove(txn, key, _unpack(raw))
          count += 1
      return count
    return run_transaction(self.engine, body)
