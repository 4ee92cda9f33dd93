"""A store of fixed-size KV-cache pages on the cluster, keyed by prefix hashes: serving's on-disk prefix cache.

  kv = SqliteKV("/shared/kvcache-index.db")               # any storage.kv engine all processes share
  store = KVCacheStore(client, kv, "/kvcache", page_bytes=64 << 10, capacity_pages=100_000)
  keys = prefix_hashes(tokens, block_size=64)             # one key per full block of tokens
  hits = store.batch_exists(keys)                         # the cached prefix: keys[:hits]
  found, pages = store.get_many(keys[:hits])              # pages: [hits, page_bytes] uint8, one IoRing submit
  store.put_many(keys[hits:], new_pages)

As 3FS's KV cache for SGLang (hf3fs): the data sit in `num_files` large files under `root`,
preallocated to capacity (`truncate`), slot `s` at offset `(s // num_files) * slot_bytes` of file
`s % num_files`; the index, key -> slot, lives in a transactional KV (`storage.kvcache_index`),
so processes on any host that share the cluster and the KV share one cache.

Write protocol: `put_many` allocates its slots pending in one transaction (a free slot, a fresh
one, or the least recently used page, evicted), writes the pages, then confirms them ready in a
second. Readers only see ready entries, a pending slot is never handed to another writer, and a
crashed writer's pending slot is recycled after `pending_timeout_s` (one value for the store,
kept in the index, so every process agrees). A pending key deleted or cleared (or released after
a failed write) keeps its slot out of use until then too: its writer may still be writing it.

Reads never return another key's bytes: each slot ends in a 64-byte trailer (magic, the key's
xxh3-128, the allocation's nonce, the page's xxh3-64) that `get_many` checks against the entry
it looked up. A page evicted and rewritten while it was read, a torn page, or a late write by a
writer whose slot was recycled all fail the check and read as a miss (and a page damaged while
its entry stayed is dropped from the index).

Cost model per call: `get_many` is one read-only KV transaction; one IoRing submit holding one
read per run of adjacent slots (a `put_many` of fresh slots lays its pages side by side, so a
cached prefix is mostly one run; the client splits a run by chunk and reads those in parallel),
plus IoRing's one meta `stat` per data file; an xxh3 pass and a copy out of a staging buffer per
page; and one read-write transaction stamping LRU use, skipped for pages stamped within
`touch_interval_s`. That stamp is best effort: if it fails (lost races, or the engine fails, e.g.
SQLite still locked after its `busy_timeout_s`, which it does wait for) it is dropped, and the
pages read are returned all the same. `put_many` is two read-write transactions plus one write
per run of adjacent slots (each write rewrites its chunks whole on every replica, so scattered
single pages cost a chunk each). `batch_exists` is one read-only transaction. With SqliteKV every
read-write transaction takes the one write lock and an fsync for all processes: batch calls.

Concurrency: any number of processes and threads; a store object is thread-safe.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import struct
import threading
import time
from typing import NamedTuple, Sequence

import numpy as np
import xxhash

from storage.client import Client
from storage.ioring import IoRing
from storage.kv import KVEngine
from storage.kvcache_index import Entry, Index

TRAILER_BYTES = 64
_TRAILER = struct.Struct("<4sIQ16sQ")  # magic, page_bytes, nonce, xxh3-128 of the key, xxh3-64 of the page
_MAGIC = b"KVC1"
MAX_KEY_BYTES = 256
_OK, _BAD, _FAILED = 0, 1, 2  # a slot read: trailer matches; trailer does not (not this write); no full read
_NUM_FILES, _PENDING_TIMEOUT_S = 1, 30.0  # a new store's defaults
_MAX_SECONDS = 1e9  # time settings above this would overflow nanosecond stamps
_NUMERIC_KINDS = "biufc"  # numpy dtype kinds a page may be given in: bool, ints, floats, complex


def _check_seconds(name: str, value, *, positive: bool) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not math.isfinite(value) or value < 0 or (positive and value == 0) or value > _MAX_SECONDS):
    raise ValueError(f"{name} must be a finite number of seconds, {'> 0' if positive else '>= 0'} and at most "
                     f"{_MAX_SECONDS:g}, got {value!r}")


def prefix_hashes(tokens, block_size: int, parent: bytes | None = None) -> list[bytes]:
  """The hash chain of the full token blocks: key `i` names the whole prefix `tokens[:(i+1)*block_size]`.

  `h_i = xxh3_128(h_{i-1} + block_i as little-endian int64).digest()` with `h_{-1} = parent`
  (b"" when None), so equal prefixes give equal keys and a key pins everything before it. A
  partial last block gets no key.

  Args:
    tokens: [num_tokens] integer token ids (a sequence or a numpy array).
    block_size: tokens per block (= per page), >= 1.
    parent: the 16-byte key of the block before `tokens[0]`, to continue a chain.

  Returns:
    num_tokens // block_size keys of 16 bytes each.
  """
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if parent is not None and (not isinstance(parent, bytes) or len(parent) != 16):
    raise ValueError(f"parent must be a 16-byte key or None, got {parent!r}")
  ids = np.asarray(tokens)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"tokens must be a 1-D sequence of integers, got shape {ids.shape} of {ids.dtype}")
  ids = ids.astype("<i8")
  keys, previous = [], parent or b""
  for start in range(0, len(ids) - block_size + 1, block_size):
    previous = xxhash.xxh3_128(previous + ids[start:start + block_size].tobytes()).digest()
    keys.append(previous)
  return keys


class Pages(NamedTuple):
  found: np.ndarray  # [num_keys] bool
  pages: np.ndarray  # [num_keys, page_bytes] uint8; rows of misses are left as they were


class KVCacheStats(NamedTuple):
  capacity_pages: int
  used_pages: int  # slots holding a page or being written, all processes
  evictions: int  # ready pages evicted for room, all processes
  reclaimed: int  # pending slots of crashed (or too slow) writers recycled, all processes
  hits: int  # pages `get`/`get_many` of this store object returned
  misses: int  # and did not
  dropped: int  # pages this store object found damaged and removed from the index


class KVCacheStore:
  """Fixed-size pages under `root` on the cluster, indexed in `kv`; see the module docstring.

  Args:
    client: a connected `storage.Client`.
    kv: the index's KV engine; every process of the cache must share it (e.g. one SqliteKV path).
    root: the absolute cluster directory of the data files; it also names the index in `kv`.
      Spellings of one directory ("/x", "/x/", "//x/./") name one store.
    page_bytes: bytes per page. None adopts the existing store's.
    capacity_pages: pages the store holds before it evicts. None adopts the existing store's.
    num_files: data files the slots are spread over. None adopts the existing store's (1 for a
      new one).
    pending_timeout_s: a slot pending longer is taken to be a crashed writer's and recycled; it
      must exceed the longest `put_many` (a writer slower than it loses its pages, never
      corrupts another's). Kept in the index, as every process must use the same; None adopts
      the existing store's (30 s for a new one).
    touch_interval_s: a hit on a page stamped within this interval is not stamped again, which
      bounds LRU writes for hot pages; 0 stamps every hit. Per store object.
  """

  def __init__(self, client: Client, kv: KVEngine, root: str = "/kvcache", *, page_bytes: int | None = None,
               capacity_pages: int | None = None, num_files: int | None = None,
               pending_timeout_s: float | None = None, touch_interval_s: float = 1.0):
    if not isinstance(root, str) or not root.startswith("/") or "\0" in root:
      raise ValueError(f"root must be an absolute cluster path, got {root!r}")
    # One directory, one index: the index is named by the root's text, so spell it one way
    # (normpath alone would keep a leading "//").
    root = posixpath.normpath(re.sub("/+", "/", root))
    for name, value in (("page_bytes", page_bytes), ("capacity_pages", capacity_pages)):
      if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if capacity_pages is not None and capacity_pages >= 1 << 32:
      raise ValueError(f"capacity_pages must be below 2**32, got {capacity_pages}")
    if num_files is not None and (not isinstance(num_files, (int, np.integer)) or num_files < 1):
      raise ValueError(f"num_files must be a positive int or None, got {num_files!r}")
    if capacity_pages is not None and num_files is not None and num_files > capacity_pages:
      raise ValueError(f"num_files={num_files} must not exceed capacity_pages={capacity_pages}")
    if pending_timeout_s is not None:
      _check_seconds("pending_timeout_s", pending_timeout_s, positive=True)
    _check_seconds("touch_interval_s", touch_interval_s, positive=False)
    self.client, self.root = client, root
    self.touch_interval_s = float(touch_interval_s)
    self._index = Index(kv, b"kvcache\0" + self.root.encode() + b"\0")
    config = self._open_config(page_bytes, capacity_pages, num_files, pending_timeout_s)
    self.page_bytes, self.capacity_pages, self.num_files = (config["page_bytes"], config["capacity_pages"],
                                                            config["num_files"])
    self.pending_timeout_s = float(config["pending_timeout_s"])
    self.slot_bytes = self.page_bytes + TRAILER_BYTES
    self._instance = os.urandom(16)
    self._lock = threading.Lock()
    self._hits = self._misses = self._dropped = 0
    self._paths = [posixpath.join(self.root, f"data-{i:04d}") for i in range(self.num_files)]
    self._stats = self._open_files()

  def _open_config(self, page_bytes, capacity_pages, num_files, pending_timeout_s) -> dict:
    wanted = {"page_bytes": page_bytes, "capacity_pages": capacity_pages, "num_files": num_files,
              "pending_timeout_s": pending_timeout_s}
    if page_bytes is None or capacity_pages is None:
      stored = self._index.config()
      if stored is None:
        raise ValueError(f"no store at root {self.root!r} yet: page_bytes and capacity_pages are needed to create one")
    else:
      stored = self._index.init({
          "page_bytes": int(page_bytes), "capacity_pages": int(capacity_pages),
          "num_files": _NUM_FILES if num_files is None else int(num_files),
          "pending_timeout_s": _PENDING_TIMEOUT_S if pending_timeout_s is None else float(pending_timeout_s)})
    stored = {"pending_timeout_s": _PENDING_TIMEOUT_S, **stored}  # a store made before it was kept: the old default
    for name, value in wanted.items():
      if value is not None and value != stored[name]:
        raise ValueError(f"{name}={value} does not match the store at root {self.root!r}, "
                         f"which has {name}={stored[name]}")
    return stored

  def _open_files(self):
    """Creates (or opens) the data files and grows each to its slots; safe to race with another process."""
    self.client.mkdir(self.root, parents=True, exist_ok=True)
    stats = []
    for i, path in enumerate(self._paths):
      slots = (self.capacity_pages - i + self.num_files - 1) // self.num_files
      stat = self.client.create(path, truncate=False)
      if stat.size < slots * self.slot_bytes:  # grows only: reads as zeros, keeps what others wrote
        stat = self.client.truncate(path, slots * self.slot_bytes)
      stats.append(stat)
    return stats

  def _where(self, slot: int) -> tuple[int, int]:
    return slot % self.num_files, (slot // self.num_files) * self.slot_bytes

  # -- validation --
  def _check_keys(self, keys, name: str = "keys") -> list[bytes]:
    keys = list(keys)
    for key in keys:
      if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"{name} must be bytes of 1 to {MAX_KEY_BYTES} bytes, got {key!r:.80}")
    return keys

  def _page_bytes(self, page, name: str = "page") -> bytes:
    if isinstance(page, np.ndarray):
      if page.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"{name} must be an array of numbers, got dtype {page.dtype}")
      data = np.ascontiguousarray(page).reshape(-1).view(np.uint8)
    elif isinstance(page, (bytes, bytearray, memoryview)):
      data = memoryview(page).cast("B")
    else:
      raise ValueError(f"{name} must be bytes or a numpy array, got {type(page).__name__}")
    if len(data) != self.page_bytes:
      raise ValueError(f"{name} must hold exactly page_bytes={self.page_bytes} bytes, got {len(data)}")
    return bytes(data)

  # -- writes --
  def put(self, key: bytes, page) -> bool:
    """Stores one page (`page`: bytes or a numeric numpy array of exactly `page_bytes` bytes); see `put_many`."""
    (key,) = self._check_keys([key], "key")
    return bool(self.put_many([key], [self._page_bytes(page)])[0])

  def put_many(self, keys: Sequence[bytes], pages) -> np.ndarray:
    """Stores pages under distinct keys: one allocation, the writes in parallel, one confirmation.

    Args:
      keys: [num_keys] distinct keys (bytes, e.g. from `prefix_hashes`).
      pages: a numeric array (any dtype but object and other non-numbers) whose leading dimension
        is num_keys and whose rows hold page_bytes bytes each (e.g. [num_keys, page_bytes] uint8),
        or a sequence of num_keys pages, each as `put` takes it.

    Returns:
      [num_keys] bool, True where this call stored the page. False: the key was cached already
      (pages are content-addressed, so it is not rewritten), another writer is storing it, no
      slot could be had (all pending), or it was deleted or recycled before the confirmation.
    """
    keys = self._check_keys(keys)
    if len(set(keys)) != len(keys):
      raise ValueError("keys must be distinct")
    datas = self._pages_bytes(pages, len(keys))
    stored = np.zeros(len(keys), bool)
    if not keys:
      return stored
    entries = self._index.allocate(keys, capacity=self.capacity_pages, pending_timeout_s=self.pending_timeout_s,
                                   instance=self._instance)
    taken = [i for i, e in enumerate(entries) if e is not None]
    if not taken:
      return stored
    blobs = [datas[i] + self._trailer(keys[i], entries[i].nonce, datas[i]) for i in taken]
    try:
      self._write_slots([entries[i].slot for i in taken], blobs)
    except BaseException:
      self._index.release([keys[i] for i in taken], [entries[i] for i in taken])
      raise
    done = self._index.confirm([keys[i] for i in taken], [entries[i] for i in taken])
    stored[taken] = done
    return stored

  def _pages_bytes(self, pages, count: int) -> list[bytes]:
    if not isinstance(pages, np.ndarray):
      pages = list(pages)
      if len(pages) != count:
        raise ValueError(f"pages must hold one page per key ({count}), got {len(pages)}")
      return [self._page_bytes(p, "pages") for p in pages]
    row_bytes = pages.itemsize * math.prod(pages.shape[1:]) if pages.ndim else -1
    if pages.dtype.kind not in _NUMERIC_KINDS or pages.ndim == 0 or pages.shape[0] != count or \
        row_bytes != self.page_bytes:
      raise ValueError(f"pages must be a numeric array of {count} rows of page_bytes={self.page_bytes} bytes, "
                       f"got shape {pages.shape} of {pages.dtype}")
    flat = np.ascontiguousarray(pages).reshape(-1).view(np.uint8)
    return [flat[i * row_bytes:(i + 1) * row_bytes].tobytes() for i in range(count)]

  def _trailer(self, key: bytes, nonce: int, data) -> bytes:
    packed = _TRAILER.pack(_MAGIC, self.page_bytes, nonce, xxhash.xxh3_128(key).digest(),
                           xxhash.xxh3_64_intdigest(data))
    return packed + bytes(TRAILER_BYTES - len(packed))

  def _runs(self, slots: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Groups slots into runs adjacent in one file, in file order: (file, offset, positions in
    `slots`). A chunk is rewritten whole on every replica per write, so 16 pages of a 1 MiB chunk
    written one by one cost 16 chunks; read one by one, 16 RPCs."""
    runs: list[tuple[int, int, list[int]]] = []
    for position in sorted(range(len(slots)), key=lambda p: self._where(slots[p])):
      file, offset = self._where(slots[position])
      if runs and runs[-1][0] == file and runs[-1][1] + len(runs[-1][2]) * self.slot_bytes == offset:
        runs[-1][2].append(position)
      else:
        runs.append((file, offset, [position]))
    return runs

  def _write_slots(self, slots: list[int], blobs: list[bytes]) -> None:
    self.client.write_at([(self._stats[file], offset, b"".join(blobs[p] for p in positions))
                          for file, offset, positions in self._runs(slots)])

  # -- reads --
  def get(self, key: bytes) -> bytes | None:
    """The page stored under `key`, or None."""
    (key,) = self._check_keys([key], "key")
    result = self.get_many([key])
    return result.pages[0].tobytes() if result.found[0] else None

  def get_many(self, keys: Sequence[bytes], out: np.ndarray | None = None) -> Pages:
    """Reads every cached page of `keys` with one IoRing submit.

    Args:
      keys: [num_keys] keys; repeats are fine.
      out: [num_keys, page_bytes] uint8 C-contiguous array to fill (allocated when None).

    Returns:
      Pages(found [num_keys] bool, pages = out); rows where found is False are untouched.
    """
    keys = self._check_keys(keys)
    if out is None:
      out = np.zeros((len(keys), self.page_bytes), np.uint8)
    elif (not isinstance(out, np.ndarray) or out.shape != (len(keys), self.page_bytes) or out.dtype != np.uint8
          or not out.flags.c_contiguous or not out.flags.writeable):
      raise ValueError(f"out must be a writable C-contiguous [{len(keys)}, {self.page_bytes}] uint8 array, got "
                       f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}")
    found = np.zeros(len(keys), bool)
    entries = self._index.lookup(keys) if keys else []
    hits = [i for i, e in enumerate(entries) if e is not None]
    if hits:
      hit_keys, hit_entries = [keys[i] for i in hits], [entries[i] for i in hits]
      staging, rows, status = self._read_slots(hit_keys, hit_entries)
      for position, i in enumerate(hits):
        if status[position] == _OK:
          out[i] = staging[rows[position], :self.page_bytes]
          found[i] = True
      self._after_read(hit_keys, hit_entries, status)
    with self._lock:
      self._hits += int(found.sum())
      self._misses += len(keys) - int(found.sum())
    return Pages(found, out)

  def _read_slots(self, keys: list[bytes], entries: list[Entry]) -> tuple[np.ndarray, list[int], list[int]]:
    """Reads the slots of `entries` with one IoRing submit (one read per run of adjacent slots)
    into a staging buffer, and checks each trailer against its entry.

    Returns:
      staging: [num_entries, slot_bytes] uint8, the slots in file order.
      rows: [num_entries], the staging row of each entry.
      status: [num_entries], _OK, _BAD or _FAILED per entry.
    """
    staging = np.empty((len(entries), self.slot_bytes), np.uint8)
    runs = self._runs([e.slot for e in entries])
    ring = IoRing(self.client, staging, entries=len(runs))
    rows, first = [0] * len(entries), 0
    for run, (file, offset, positions) in enumerate(runs):
      for row, position in enumerate(positions, first):
        rows[position] = row
      ring.prepare(self._paths[file], offset, len(positions) * self.slot_bytes,
                   buffer_offset=first * self.slot_bytes, userdata=run)
      first += len(positions)
    ring.submit()
    status = [_FAILED] * len(entries)
    for done in ring.wait(timeout=4 * self.client.timeout_s):  # a read still running then counts as failed
      positions = runs[done.userdata][2]
      if done.result != len(positions) * self.slot_bytes:
        continue  # an I/O error or a short file: misses, not evidence the pages are damaged
      for position in positions:
        row = staging[rows[position]]
        magic, page_bytes, nonce, key_hash, checksum = _TRAILER.unpack_from(row, self.page_bytes)
        good = (magic == _MAGIC and page_bytes == self.page_bytes and nonce == entries[position].nonce
                and key_hash == xxhash.xxh3_128(keys[position]).digest()
                and checksum == xxhash.xxh3_64_intdigest(row[:self.page_bytes]))
        status[position] = _OK if good else _BAD
    return staging, rows, status

  def _after_read(self, keys: list[bytes], entries: list[Entry], status: list[int]) -> None:
    """Stamps the pages read as used (those not stamped within `touch_interval_s`) and drops the
    damaged ones, in one transaction. A page whose entry changed since the lookup is left alone:
    it was evicted or replaced, and its bad trailer proves nothing about the new one. Best effort
    (`Index.touch` never raises a KVError): the pages were read, so a failed stamp only costs LRU
    order; with SqliteKV it may wait up to the engine's `busy_timeout_s` for the write lock."""
    stale_before = time.time_ns() - int(self.touch_interval_s * 1e9)
    work = [(k, e, s == _BAD) for k, e, s in zip(keys, entries, status)
            if s == _BAD or (s == _OK and e.stamp <= stale_before)]
    if not work:
      return
    keys, entries, drop = zip(*work)
    dropped = self._index.touch(keys, entries, drop=drop)
    if dropped:
      with self._lock:
        self._dropped += dropped

  # -- index --
  def exists(self, key: bytes) -> bool:
    """Whether a ready page is indexed under `key` (a later `get` may still miss: eviction)."""
    (key,) = self._check_keys([key], "key")
    return self._index.leading_ready([key]) == 1

  def batch_exists(self, keys: Sequence[bytes]) -> int:
    """How many of `keys`, from the first, are cached: the length of the cached prefix, in one
    read-only transaction that stops at the first miss. Index only: no data is read or stamped."""
    return self._index.leading_ready(self._check_keys(keys))

  def delete(self, key: bytes) -> bool:
    """Removes `key`'s page (ready or being written); returns whether there was one."""
    (key,) = self._check_keys([key], "key")
    return self._index.delete([key]) == 1

  def delete_many(self, keys: Sequence[bytes]) -> int:
    """Removes the pages of `keys` in one transaction; returns how many there were."""
    return self._index.delete(self._check_keys(keys))

  def clear(self, *, batch: int = 512) -> int:
    """Removes every page, `batch` keys per listing (and per transaction, or fewer where the
    engine caps a transaction's operations); returns how many. Other processes may go on
    meanwhile: a page written while it runs may survive it, and the slots of pages being
    written stay out of use until `pending_timeout_s` has passed."""
    if batch < 1:
      raise ValueError(f"batch must be positive, got {batch}")
    removed = 0
    while keys := self._index.keys(batch):
      removed += self._index.delete(keys)
    return removed

  def stats(self) -> KVCacheStats:
    used, evictions, reclaimed = self._index.usage()
    with self._lock:
      return KVCacheStats(self.capacity_pages, used, evictions, reclaimed, self._hits, self._misses, self._dropped)
