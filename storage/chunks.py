"""A storage target's chunk store on local disk, with CRAQ's committed and pending versions.

Each chunk version is its own file, written to a temp name, fsynced and renamed into place
(write-new-then-rename), so a crash never leaves a torn chunk. Chunk metadata (versions, chain
version, length, xxh3-64 checksum of the whole chunk) lives in a SQLite table beside the files;
a read re-hashes the data and raises `ChunkCorrupted` on a mismatch, so the client can read
another replica. A chunk with a pending (uncommitted) version answers reads with
`PendingWrite` ("retry"), unless the read is relaxed, as 3FS does. Inodes whose chunks were
reclaimed are remembered (a tombstone per inode), so a late reader of a removed file is told so
instead of reading zeros.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import threading
from typing import NamedTuple

import xxhash

from storage.cluster.resync import ChunkMeta


class ChunkError(RuntimeError):
  """A chunk operation failed."""


class ChunkNotFound(ChunkError):
  pass


class ChunkCorrupted(ChunkError):
  """The bytes on disk do not match the chunk's checksum."""


class PendingWrite(ChunkError):
  """A write to this chunk is in flight; retry, or read relaxed."""


class ChunkId(NamedTuple):
  inode: int
  index: int

  @property
  def name(self) -> str:
    return f"{self.inode:016x}-{self.index:08x}"


class _Row(NamedTuple):
  chain_version: int
  committed: int
  update: int
  length: int
  checksum: int
  pending_checksum: int


def checksum(data: bytes) -> int:
  """xxh3-64 of `data` as a signed 64-bit int (what SQLite's INTEGER holds)."""
  return int.from_bytes(xxhash.xxh3_64_digest(data), "big", signed=True)


class ChunkStore:
  """The chunks of one storage target under `root`, each at most `chunk_size` bytes."""

  def __init__(self, root, chunk_size: int):
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    self.root = pathlib.Path(root)
    self.chunk_size = chunk_size
    (self.root / "data").mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()
    self._db = sqlite3.connect(self.root / "chunks.db", isolation_level=None, check_same_thread=False)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=FULL")
    self._db.execute("CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, chain_version INTEGER, "
                     "committed INTEGER, update_ver INTEGER, length INTEGER, checksum INTEGER, pending_checksum INTEGER)")
    self._db.execute("CREATE TABLE IF NOT EXISTS removed_inodes (inode INTEGER PRIMARY KEY)")
    self._drop_stale_pending()

  def _drop_stale_pending(self) -> None:
    """A pending version found at open belongs to a write that died with the process: drop it, so
    the chunk reads as committed and resync compares committed versions (3FS abandons it too)."""
    rows = self._db.execute("SELECT id, committed, update_ver FROM chunks WHERE update_ver != committed").fetchall()
    for name, committed, update in rows:
      (self.root / "data" / f"{name}.v{update}").unlink(missing_ok=True)
      if committed == 0:
        self._db.execute("DELETE FROM chunks WHERE id=?", (name,))
      else:
        self._db.execute("UPDATE chunks SET update_ver=committed, pending_checksum=0 WHERE id=?", (name,))
    for tmp in (self.root / "data").glob("*.tmp"):
      tmp.unlink(missing_ok=True)

  def _path(self, chunk: ChunkId, version: int) -> pathlib.Path:
    return self.root / "data" / f"{chunk.name}.v{version}"

  def _row(self, chunk: ChunkId) -> _Row | None:
    row = self._db.execute("SELECT chain_version, committed, update_ver, length, checksum, pending_checksum "
                           "FROM chunks WHERE id=?", (chunk.name,)).fetchone()
    return None if row is None else _Row(*row)

  def _put_row(self, chunk: ChunkId, row: _Row) -> None:
    self._db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", (chunk.name, *row))

  def _write_file(self, path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def _load(self, chunk: ChunkId, version: int, expected: int) -> bytes:
    if version == 0:
      return b""
    try:
      data = self._path(chunk, version).read_bytes()
    except FileNotFoundError:
      raise ChunkCorrupted(f"chunk {chunk.name} version {version} is missing on disk") from None
    if checksum(data) != expected:
      raise ChunkCorrupted(f"chunk {chunk.name} version {version} fails its checksum")
    return data

  def meta(self, chunk: ChunkId) -> ChunkMeta | None:
    """`(chain_version, committed, update)` of a chunk, or None if it does not exist."""
    with self._lock:
      row = self._row(chunk)
    return None if row is None else ChunkMeta(row.chain_version, row.committed, row.update)

  def read(self, chunk: ChunkId, offset: int = 0, length: int | None = None, *, relaxed: bool = False) -> bytes:
    """Bytes `[offset, offset + length)` of the committed version (the pending one if `relaxed`)."""
    with self._lock:
      row = self._row(chunk)
      if row is None:
        raise ChunkNotFound(f"chunk {chunk.name} does not exist")
      pending = row.update != row.committed
      if pending and not relaxed:
        raise PendingWrite(f"chunk {chunk.name} has a write in flight (version {row.update})")
      version, expected = (row.update, row.pending_checksum) if pending else (row.committed, row.checksum)
      data = self._load(chunk, version, expected)
    end = len(data) if length is None else offset + length
    return data[offset:end]

  def prepare(self, chunk: ChunkId, offset: int, data: bytes, chain_version: int, *,
              full_replace: bool = False, cut: int | None = None) -> int:
    """Stores a pending version: the committed chunk with `data` at `offset` (or `data` alone;
    or, with `cut`, the committed chunk's first `cut` bytes: a truncation).

    Returns the pending version, `committed + 1`. Raises `PendingWrite` if one is already pending
    (writes to a chunk are serialized at the chain head; see 3FS's per-chunk lock).
    """
    if offset < 0 or offset + len(data) > self.chunk_size:
      raise ValueError(f"write [{offset}, {offset + len(data)}) does not fit a chunk of {self.chunk_size} bytes")
    with self._lock:
      row = self._row(chunk) or _Row(chain_version, 0, 0, 0, checksum(b""), 0)
      if row.update != row.committed:
        raise PendingWrite(f"chunk {chunk.name} already has pending version {row.update}")
      if full_replace:
        content = bytes(data)
      elif cut is not None:
        content = self._load(chunk, row.committed, row.checksum)[:cut]
      else:
        content = bytearray(self._load(chunk, row.committed, row.checksum))
        if len(content) < offset:
          content.extend(bytes(offset - len(content)))  # a hole reads as zeros
        content[offset:offset + len(data)] = data
        content = bytes(content)
      version = row.committed + 1
      self._write_file(self._path(chunk, version), content)
      self._put_row(chunk, row._replace(update=version, pending_checksum=checksum(content)))
      return version

  def replace_pending(self, chunk: ChunkId, data: bytes, version: int, chain_version: int) -> None:
    """Stores a forwarded write: the whole chunk as pending `version` (CRAQ successors, and
    syncing replicas, receive full chunks)."""
    if len(data) > self.chunk_size:
      raise ValueError(f"{len(data)} bytes do not fit a chunk of {self.chunk_size}")
    with self._lock:
      row = self._row(chunk) or _Row(chain_version, 0, 0, 0, checksum(b""), 0)
      if row.update != row.committed:
        raise PendingWrite(f"chunk {chunk.name} already has pending version {row.update}")
      if version <= row.committed:
        raise ChunkError(f"chunk {chunk.name}: forwarded version {version} is not newer than {row.committed}")
      self._write_file(self._path(chunk, version), bytes(data))
      self._put_row(chunk, row._replace(update=version, pending_checksum=checksum(bytes(data))))

  def commit(self, chunk: ChunkId, version: int, chain_version: int) -> None:
    """Makes pending `version` the committed one (at the tail, or on the acknowledgement)."""
    with self._lock:
      row = self._row(chunk)
      if row is None or row.update != version:
        raise ChunkError(f"chunk {chunk.name} has no pending version {version}")
      if row.committed == version:
        return
      old = row.committed
      length = self._path(chunk, version).stat().st_size
      self._put_row(chunk, _Row(chain_version, version, version, length, row.pending_checksum, 0))
      if old:
        self._path(chunk, old).unlink(missing_ok=True)

  def abort(self, chunk: ChunkId) -> None:
    """Drops a pending version."""
    with self._lock:
      row = self._row(chunk)
      if row is None or row.update == row.committed:
        return
      self._path(chunk, row.update).unlink(missing_ok=True)
      if row.committed == 0:
        self._db.execute("DELETE FROM chunks WHERE id=?", (chunk.name,))
      else:
        self._put_row(chunk, row._replace(update=row.committed, pending_checksum=0))

  def replace(self, chunk: ChunkId, data: bytes, version: int, chain_version: int) -> None:
    """A full-chunk-replace write from a predecessor during resync: committed at once, pending dropped."""
    if len(data) > self.chunk_size:
      raise ValueError(f"{len(data)} bytes do not fit a chunk of {self.chunk_size}")
    with self._lock:
      row = self._row(chunk)
      self._write_file(self._path(chunk, version), bytes(data))
      self._put_row(chunk, _Row(chain_version, version, version, len(data), checksum(bytes(data)), 0))
      for stale in {row.committed, row.update} - {version, 0} if row else ():
        self._path(chunk, stale).unlink(missing_ok=True)

  def remove(self, chunk: ChunkId) -> None:
    with self._lock:
      row = self._row(chunk)
      if row is None:
        return
      for version in {row.committed, row.update} - {0}:
        self._path(chunk, version).unlink(missing_ok=True)
      self._db.execute("DELETE FROM chunks WHERE id=?", (chunk.name,))

  def length(self, chunk: ChunkId) -> int:
    """Bytes in the committed version (0 for a chunk that does not exist)."""
    with self._lock:
      row = self._row(chunk)
    return 0 if row is None else row.length

  def chunks_of(self, inode: int) -> list[ChunkId]:
    """Every chunk of `inode` held here, by index (one range scan of the ids)."""
    prefix = f"{inode:016x}-"
    with self._lock:
      rows = self._db.execute("SELECT id FROM chunks WHERE id >= ? AND id < ? ORDER BY id",
                              (prefix, f"{inode:016x}.")).fetchall()
    return [ChunkId(inode, int(name[len(prefix):], 16)) for name, in rows]

  def mark_removed(self, *inodes: int) -> None:
    """Remembers that these inodes' files were removed (their chunks are being reclaimed); one commit."""
    with self._lock:
      self._db.execute("BEGIN")
      self._db.executemany("INSERT OR IGNORE INTO removed_inodes VALUES (?)", [(i,) for i in inodes])
      self._db.execute("COMMIT")

  def removed_inodes(self) -> list[int]:
    with self._lock:
      return [inode for inode, in self._db.execute("SELECT inode FROM removed_inodes")]

  def is_removed(self, inode: int) -> bool:
    with self._lock:
      return self._db.execute("SELECT 1 FROM removed_inodes WHERE inode=?", (inode,)).fetchone() is not None

  def dump_meta(self) -> dict[str, ChunkMeta]:
    """Every chunk's `(chain_version, committed, update)`, keyed by chunk name: resync's dump-chunkmeta."""
    with self._lock:
      rows = self._db.execute("SELECT id, chain_version, committed, update_ver FROM chunks").fetchall()
    return {name: ChunkMeta(cv, c, u) for name, cv, c, u in rows}

  def close(self) -> None:
    self._db.close()
