"""The embedded default KV engine: one SQLite file in WAL mode, safe across threads and processes.

Reads run inside a SQLite read transaction, so they see one snapshot (WAL keeps it stable while
others commit). A read-write transaction records what it read; at commit it takes SQLite's write
lock (`BEGIN IMMEDIATE`), checks that none of those keys or ranges changed after its snapshot,
and applies its writes under a new version. Deleted keys stay as tombstones (value NULL) so that
a delete conflicts with a concurrent read of the same key or range. Every `PURGE_EVERY` commits
the tombstones older than the previous purge are dropped and that version becomes the horizon:
a transaction that read something and began before the horizon conflicts (and is retried), as
it might have needed a dropped tombstone to see its conflict. `synchronous=FULL`: a committed
transaction survives a crash of the process and of the machine.
"""

from __future__ import annotations

import pathlib
import queue
import sqlite3

from storage.kv.engine import Conflict, KVEngine, KVError, Transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 0);
INSERT OR IGNORE INTO meta VALUES ('horizon', 0);
INSERT OR IGNORE INTO meta VALUES ('next_horizon', 0);
"""
PURGE_EVERY = 1024  # commits between tombstone purges: a transaction spanning more may conflict once


class SqliteKV(KVEngine):
  """A KV engine over the SQLite database at `path` (created if missing)."""

  def __init__(self, path, *, busy_timeout_s: float = 30.0):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._timeout = busy_timeout_s
    self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
    conn = self._connect()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    self._pool.put(conn)

  def _connect(self) -> sqlite3.Connection:
    conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    return conn

  def _acquire(self) -> sqlite3.Connection:
    try:
      return self._pool.get_nowait()
    except queue.Empty:
      return self._connect()

  def _release(self, conn: sqlite3.Connection) -> None:
    self._pool.put(conn)

  def read_only(self) -> Transaction:
    return _SqliteTransaction(self, read_only=True)

  def read_write(self) -> Transaction:
    return _SqliteTransaction(self, read_only=False)

  def close(self) -> None:
    while True:
      try:
        self._pool.get_nowait().close()
      except queue.Empty:
        return


class _SqliteTransaction(Transaction):
  def __init__(self, engine: SqliteKV, read_only: bool):
    super().__init__(read_only)
    self._engine = engine
    self._conn = engine._acquire()
    self._conn.execute("BEGIN")  # deferred: the snapshot starts at the first read, just below
    self._start = self._conn.execute("SELECT value FROM meta WHERE name='version'").fetchone()[0]
    self._read_keys: set[bytes] = set()
    self._read_ranges: list[tuple[bytes, bytes]] = []

  def _read(self, key: bytes) -> bytes | None:
    self._read_keys.add(key)
    row = self._conn.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    return None if row is None else row[0]

  def _read_range(self, begin: bytes, end: bytes, limit: int | None) -> list[tuple[bytes, bytes]]:
    self._read_ranges.append((begin, end))
    sql = "SELECT key, value FROM kv WHERE key>=? AND key<? AND value IS NOT NULL ORDER BY key"
    params: tuple = (begin, end)
    if limit is not None:
      sql += " LIMIT ?"
      params += (limit,)
    return [(bytes(k), bytes(v)) for k, v in self._conn.execute(sql, params)]

  def _commit(self, writes: dict[bytes, bytes | None]) -> None:
    conn = self._conn
    try:
      conn.execute("ROLLBACK")  # leave the snapshot, then take the write lock
      conn.execute("BEGIN IMMEDIATE")
      stale = any(conn.execute("SELECT 1 FROM kv WHERE key=? AND version>?", (k, self._start)).fetchone()
                  for k in self._read_keys)
      stale = stale or any(conn.execute("SELECT 1 FROM kv WHERE key>=? AND key<? AND version>? LIMIT 1",
                                        (b, e, self._start)).fetchone() for b, e in self._read_ranges)
      meta = dict(conn.execute("SELECT name, value FROM meta"))
      if (self._read_keys or self._read_ranges) and self._start < meta["horizon"]:
        stale = True  # tombstones it may have needed were purged since it began
      if stale:
        conn.execute("ROLLBACK")
        raise Conflict("a key this transaction read changed before it committed")
      version = meta["version"] + 1
      conn.executemany("INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value, "
                       "version=excluded.version", [(k, v, version) for k, v in writes.items()])
      conn.execute("UPDATE meta SET value=? WHERE name='version'", (version,))
      if version % PURGE_EVERY == 0:
        conn.execute("DELETE FROM kv WHERE value IS NULL AND version<=?", (meta["next_horizon"],))
        conn.execute("UPDATE meta SET value=? WHERE name='horizon'", (meta["next_horizon"],))
        conn.execute("UPDATE meta SET value=? WHERE name='next_horizon'", (version,))
      conn.execute("COMMIT")
    except sqlite3.Error as err:
      if conn.in_transaction:
        conn.execute("ROLLBACK")
      raise KVError(f"sqlite commit failed: {err}") from err
    finally:
      self._engine._release(conn)

  def _release(self) -> None:
    if self._conn.in_transaction:
      self._conn.execute("ROLLBACK")
    self._engine._release(self._conn)
