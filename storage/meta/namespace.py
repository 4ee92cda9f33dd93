"""File-system semantics over the KV seam: what a stateless 3FS meta server computes.

Every operation is one KV transaction (retried on conflict), so meta servers share nothing but
the KV store. Keys follow 3FS:

  INOD + inode id (8 bytes, little-endian, spreading load)   -> inode (msgpack)
  DENT + parent id + name                                    -> {"id", "type"}: a directory is one key range
  INOS + inode id + session id                               -> an open writer session
  SING + "inode-counter"                                     -> the last inode id handed out
  GCQU + inode id                                            -> a removed file whose chunks await reclaiming

A file's layout names its chunk size, stripe and chains; chunk i lives on `chains[i % stripe]`.
Lengths are exact after `close` (the writer reports its final length) or `truncate`. Removing
a file (unlink, rename over it, or truncate-on-create) moves its inode to the GC queue; the meta
server reclaims its chunks once its writers have closed (`garbage`, `forget_garbage`).
"""

from __future__ import annotations

import errno
import random
import time
import uuid
from typing import Any, NamedTuple

import msgpack

from storage.kv import KVEngine, Transaction, run_transaction

ROOT_ID = 1
_INODE, _DENTRY, _SESSION, _SINGLETON, _GARBAGE = b"INOD", b"DENT", b"INOS", b"SING", b"GCQU"
_COUNTER = _SINGLETON + b"inode-counter"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


class Layout(NamedTuple):
  chunk_size: int
  chains: tuple[int, ...]  # the file's stripe: chunk i is on chains[i % len(chains)]

  def chain_of(self, chunk_index: int) -> int:
    return self.chains[chunk_index % len(self.chains)]


class Stat(NamedTuple):
  inode: int
  is_dir: bool
  size: int
  mode: int
  mtime: float
  nlink: int
  layout: Layout | None


def _id(inode: int) -> bytes:
  return inode.to_bytes(8, "little")


def _inode_key(inode: int) -> bytes:
  return _INODE + _id(inode)


def _dentry_key(parent: int, name: str) -> bytes:
  return _DENTRY + _id(parent) + name.encode()


def _dir_range(parent: int) -> tuple[bytes, bytes]:
  prefix = _DENTRY + _id(parent)
  return prefix, prefix + b"\xff" * (MAX_NAME_BYTES + 1)


def split_path(path: str) -> list[str]:
  """Absolute path -> its components; ValueError for anything ambiguous or hostile."""
  if not isinstance(path, str) or not path.startswith("/"):
    raise ValueError(f"paths must be absolute strings, got {path!r}")
  if "\0" in path or len(path.encode()) > MAX_PATH_BYTES:
    raise ValueError(f"path {path[:80]!r} holds NUL or is longer than {MAX_PATH_BYTES} bytes")
  parts = [p for p in path.split("/") if p not in ("", ".")]
  if ".." in parts:
    raise ValueError(f"path {path!r} contains '..'; pass a normalized path")
  for part in parts:
    if len(part.encode()) > MAX_NAME_BYTES:
      raise ValueError(f"name {part[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
  return parts


class Namespace:
  """The namespace stored in `engine`; creates the root directory if the store is empty.

  Args:
    engine: the KV store.
    chains: chain ids of the chain table files are striped over.
    chunk_size: default bytes per chunk.
    stripe: default chains per file (at most len(chains)).
  """

  def __init__(self, engine: KVEngine, chains=(1,), *, chunk_size: int = 1 << 20, stripe: int = 16):
    if not chains:
      raise ValueError("chains must name at least one chain")
    if chunk_size < 1 or stripe < 1:
      raise ValueError(f"chunk_size and stripe must be positive, got {chunk_size} and {stripe}")
    self.engine = engine
    self.chains = tuple(int(c) for c in chains)
    self.chunk_size = chunk_size
    self.stripe = min(stripe, len(self.chains))
    run_transaction(engine, self._ensure_root)

  # -- encoding --
  @staticmethod
  def _get_inode(txn: Transaction, inode: int) -> dict[str, Any]:
    raw = txn.get(_inode_key(inode))
    if raw is None:
      raise FileNotFoundError(f"inode {inode} does not exist")
    return msgpack.unpackb(raw)

  @staticmethod
  def _put_inode(txn: Transaction, inode: int, value: dict[str, Any]) -> None:
    txn.set(_inode_key(inode), msgpack.packb(value))

  def _ensure_root(self, txn: Transaction) -> None:
    if txn.get(_inode_key(ROOT_ID)) is None:
      self._put_inode(txn, ROOT_ID, {"dir": True, "mode": 0o755, "mtime": time.time(), "nlink": 2, "parent": ROOT_ID})
      txn.set(_COUNTER, _id(ROOT_ID))

  def _retire(self, txn: Transaction, inode_id: int, value: dict[str, Any]) -> None:
    """Removes a file's inode, queueing its chunks for reclaiming."""
    txn.clear(_inode_key(inode_id))
    txn.set(_GARBAGE + _id(inode_id), msgpack.packb({**value, "removed_at": time.time()}))

  def _new_inode_id(self, txn: Transaction) -> int:
    last = int.from_bytes(txn.get(_COUNTER) or _id(ROOT_ID), "little")
    txn.set(_COUNTER, _id(last + 1))
    return last + 1

  # -- lookups --
  def _resolve(self, txn: Transaction, parts: list[str], path: str) -> int:
    inode = ROOT_ID
    for depth, name in enumerate(parts):
      if depth and not self._get_inode(txn, inode)["dir"]:
        raise NotADirectoryError(f"{'/' + '/'.join(parts[:depth])} in {path} is not a directory")
      raw = txn.get(_dentry_key(inode, name))
      if raw is None:
        raise FileNotFoundError(f"no such file or directory: {path}")
      inode = msgpack.unpackb(raw)["id"]
    return inode

  def _parent(self, txn: Transaction, path: str) -> tuple[int, str]:
    parts = split_path(path)
    if not parts:
      raise PermissionError("the root directory cannot be created, moved or removed")
    parent = self._resolve(txn, parts[:-1], path)
    if not self._get_inode(txn, parent)["dir"]:
      raise NotADirectoryError(f"the parent of {path} is not a directory")
    return parent, parts[-1]

  def _stat(self, inode_id: int, inode: dict[str, Any]) -> Stat:
    layout = Layout(inode["chunk_size"], tuple(inode["chains"])) if not inode["dir"] else None
    return Stat(inode_id, inode["dir"], inode.get("length", 0), inode["mode"], inode["mtime"], inode["nlink"], layout)

  def stat(self, path: str) -> Stat:
    def body(txn):
      inode = self._resolve(txn, split_path(path), path)
      return self._stat(inode, self._get_inode(txn, inode))
    return run_transaction(self.engine, body, read_only=True)

  def listdir(self, path: str) -> list[str]:
    """Names in a directory, sorted (one range read)."""
    def body(txn):
      inode = self._resolve(txn, split_path(path), path)
      if not self._get_inode(txn, inode)["dir"]:
        raise NotADirectoryError(f"not a directory: {path}")
      begin, end = _dir_range(inode)
      return [key[len(begin):].decode() for key, _ in txn.get_range(begin, end)]
    return run_transaction(self.engine, body, read_only=True)

  # -- creation --
  def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755) -> Stat:
    parts = split_path(path)
    if parents:
      for depth in range(1, len(parts)):
        self.mkdir("/" + "/".join(parts[:depth]), exist_ok=True, mode=mode)

    def body(txn):
      parent, name = self._parent(txn, path)
      existing = txn.get(_dentry_key(parent, name))
      if existing is not None:
        entry = msgpack.unpackb(existing)
        if exist_ok and entry["type"] == "dir":
          return self._stat(entry["id"], self._get_inode(txn, entry["id"]))
        raise FileExistsError(f"file exists: {path}")
      inode = self._new_inode_id(txn)
      value = {"dir": True, "mode": mode, "mtime": time.time(), "nlink": 2, "parent": parent}
      self._put_inode(txn, inode, value)
      txn.set(_dentry_key(parent, name), msgpack.packb({"id": inode, "type": "dir"}))
      return self._stat(inode, value)
    return run_transaction(self.engine, body)

  def create(self, path: str, *, exclusive: bool = False, truncate: bool = True, mode: int = 0o644,
             chunk_size: int | None = None, stripe: int | None = None) -> Stat:
    """Creates a file (or opens an existing one, truncated when `truncate`) and returns its stat.

    Truncating a file that holds data replaces its inode, as `open(path, "wb")` over an old file.
    """
    chunk_size = chunk_size or self.chunk_size
    stripe = min(stripe or self.stripe, len(self.chains))

    def body(txn):
      parent, name = self._parent(txn, path)
      existing = txn.get(_dentry_key(parent, name))
      if existing is not None:
        entry = msgpack.unpackb(existing)
        if exclusive:
          raise FileExistsError(f"file exists: {path}")
        if entry["type"] == "dir":
          raise IsADirectoryError(f"is a directory: {path}")
        inode = self._get_inode(txn, entry["id"])
        if not truncate:
          return self._stat(entry["id"], inode)
        # Truncating gives the file a fresh inode (and so fresh chunk ids), even at length 0 (a
        # writer that never closed leaves chunks but no length): old chunks can never show
        # through holes the new content leaves. The old inode goes to the GC queue.
        self._retire(txn, entry["id"], inode)
      inode_id = self._new_inode_id(txn)
      # 3FS: `stripe` consecutive chains from a round-robin start, shuffled with a per-file seed.
      start = inode_id % len(self.chains)
      chains = [self.chains[(start + i) % len(self.chains)] for i in range(stripe)]
      random.Random(inode_id).shuffle(chains)
      value = {"dir": False, "mode": mode, "mtime": time.time(), "nlink": 1, "length": 0, "truncate_version": 0,
               "chunk_size": chunk_size, "chains": chains}
      self._put_inode(txn, inode_id, value)
      txn.set(_dentry_key(parent, name), msgpack.packb({"id": inode_id, "type": "file"}))
      return self._stat(inode_id, value)
    return run_transaction(self.engine, body)

  # -- writer sessions and lengths --
  def open_session(self, inode: int) -> str:
    """Registers a writer; the file's length becomes exact when the session closes."""
    session = uuid.uuid4().hex
    def body(txn):
      self._get_inode(txn, inode)
      txn.set(_SESSION + _id(inode) + session.encode(), msgpack.packb({"opened": time.time()}))
    run_transaction(self.engine, body)
    return session

  def close_session(self, inode: int, session: str, length: int | None) -> Stat:
    """Ends a writer session, recording the file's length (the largest the writer produced, or
    the current one if larger: other writers may have extended it)."""
    def body(txn):
      key = _SESSION + _id(inode) + session.encode()
      if txn.get(key) is None:
        if txn.get(_inode_key(inode)) is None and txn.get(_GARBAGE + _id(inode)) is None:
          raise FileNotFoundError(f"inode {inode} was removed and reclaimed while this writer held it open")
        raise ValueError(f"no open session {session} on inode {inode}")
      txn.clear(key)
      removed = txn.get(_GARBAGE + _id(inode))
      if removed is not None and txn.get(_inode_key(inode)) is None:  # removed while written: just let go
        return self._stat(inode, msgpack.unpackb(removed))
      value = self._get_inode(txn, inode)
      if length is not None and length > value["length"]:
        value.update(length=length, mtime=time.time())
        self._put_inode(txn, inode, value)
      return self._stat(inode, value)
    return run_transaction(self.engine, body)

  def sessions(self, inode: int, *, younger_than_s: float | None = None) -> int:
    """Open writer sessions of `inode`; with `younger_than_s`, only those opened since then."""
    prefix = _SESSION + _id(inode)
    now = time.time()
    def body(txn):
      found = [msgpack.unpackb(v) for _, v in txn.get_range(prefix, prefix + b"\xff" * 40)]
      return sum(1 for s in found if younger_than_s is None or now - s["opened"] < younger_than_s)
    return run_transaction(self.engine, body, read_only=True)

  def truncate(self, path: str, length: int) -> Stat:
    """Sets the length of the file at `path` (metadata only: see `MetaServer` for the chunks)."""
    inode = run_transaction(self.engine, lambda txn: self._resolve(txn, split_path(path), path), read_only=True)
    return self.truncate_inode(inode, length, path=path)

  def truncate_inode(self, inode_id: int, length: int, *, path: str = "") -> Stat:
    """Sets the length of inode `inode_id` wherever it is now (a rename since does not matter)."""
    if length < 0:
      raise ValueError(f"length must be >= 0, got {length}")
    def body(txn):
      value = self._get_inode(txn, inode_id)
      if value["dir"]:
        raise IsADirectoryError(f"is a directory: {path}")
      value.update(length=length, mtime=time.time(), truncate_version=value["truncate_version"] + 1)
      self._put_inode(txn, inode_id, value)
      return self._stat(inode_id, value)
    return run_transaction(self.engine, body)

  # -- removal and rename --
  def unlink(self, path: str) -> Stat:
    """Removes a file's name; returns its last stat so the caller can free its chunks."""
    def body(txn):
      parent, name = self._parent(txn, path)
      raw = txn.get(_dentry_key(parent, name))
      if raw is None:
        raise FileNotFoundError(f"no such file: {path}")
      entry = msgpack.unpackb(raw)
      if entry["type"] == "dir":
        raise IsADirectoryError(f"is a directory (use rmdir): {path}")
      value = self._get_inode(txn, entry["id"])
      txn.clear(_dentry_key(parent, name))
      self._retire(txn, entry["id"], value)
      return self._stat(entry["id"], value)
    return run_transaction(self.engine, body)

  def rmdir(self, path: str) -> None:
    def body(txn):
      parent, name = self._parent(txn, path)
      raw = txn.get(_dentry_key(parent, name))
      if raw is None:
        raise FileNotFoundError(f"no such directory: {path}")
      entry = msgpack.unpackb(raw)
      if entry["type"] != "dir":
        raise NotADirectoryError(f"not a directory: {path}")
      begin, end = _dir_range(entry["id"])
      if txn.get_range(begin, end, limit=1):  # a read range: a concurrent create conflicts
        raise OSError(errno.ENOTEMPTY, f"directory not empty: {path}")
      txn.clear(_dentry_key(parent, name))
      txn.clear(_inode_key(entry["id"]))
    run_transaction(self.engine, body)

  def rename(self, src: str, dst: str) -> None:
    """Atomically moves `src` to `dst`, replacing a file or an empty directory there.

    Refuses to move a directory into its own subtree (walks dst's ancestors by parent ids).
    """
    def body(txn):
      src_parent, src_name = self._parent(txn, src)
      dst_parent, dst_name = self._parent(txn, dst)
      raw = txn.get(_dentry_key(src_parent, src_name))
      if raw is None:
        raise FileNotFoundError(f"no such file or directory: {src}")
      entry = msgpack.unpackb(raw)
      if entry["type"] == "dir":
        ancestor = dst_parent
        while True:  # is src an ancestor of (or equal to) dst's parent?
          if ancestor == entry["id"]:
            raise ValueError(f"cannot move {src} into itself ({dst})")
          if ancestor == ROOT_ID:
            break
          ancestor = self._get_inode(txn, ancestor)["parent"]
      if (src_parent, src_name) == (dst_parent, dst_name):
        return
      existing = txn.get(_dentry_key(dst_parent, dst_name))
      if existing is not None:
        target = msgpack.unpackb(existing)
        if target["type"] == "dir":
          if entry["type"] != "dir":
            raise IsADirectoryError(f"cannot replace directory {dst} with a file")
          begin, end = _dir_range(target["id"])
          if txn.get_range(begin, end, limit=1):
            raise OSError(errno.ENOTEMPTY, f"directory not empty: {dst}")
        elif entry["type"] == "dir":
          raise NotADirectoryError(f"cannot replace file {dst} with a directory")
        if target["type"] == "dir":
          txn.clear(_inode_key(target["id"]))
        else:
          self._retire(txn, target["id"], self._get_inode(txn, target["id"]))
      txn.clear(_dentry_key(src_parent, src_name))
      txn.set(_dentry_key(dst_parent, dst_name), msgpack.packb(entry))
      if entry["type"] == "dir":
        value = self._get_inode(txn, entry["id"])
        value["parent"] = dst_parent
        self._put_inode(txn, entry["id"], value)
    run_transaction(self.engine, body)

  # -- reclaiming removed files --
  def garbage(self, *, older_than_s: float = 0.0, session_ttl_s: float = 86400.0, limit: int = 64,
              skip: frozenset = frozenset()) -> list[tuple[int, Layout]]:
    """Up to `limit` removed files whose chunks may be reclaimed now: removed at least
    `older_than_s` ago (a grace period for readers that opened them before), not in `skip`,
    and with no writer session younger than `session_ttl_s` (older ones are writers that died
    without closing). Scans the whole queue."""
    def body(txn):
      ready = []
      now = time.time()
      for key, raw in txn.get_range(_GARBAGE, _GARBAGE + b"\xff" * 9):
        inode = int.from_bytes(key[len(_GARBAGE):], "little")
        value = msgpack.unpackb(raw)
        if inode in skip or now - value["removed_at"] < older_than_s:
          continue
        sessions = _SESSION + _id(inode)
        if any(now - msgpack.unpackb(s)["opened"] < session_ttl_s
               for _, s in txn.get_range(sessions, sessions + b"\xff" * 40)):
          continue
        ready.append((inode, Layout(value["chunk_size"], tuple(value["chains"]))))
        if len(ready) == limit:
          break
      return ready
    return run_transaction(self.engine, body, read_only=True)

  def forget_garbage(self, inode: int) -> None:
    """Drops a reclaimed file from the GC queue, and any writer sessions it still had."""
    def body(txn):
      txn.clear(_GARBAGE + _id(inode))
      sessions = _SESSION + _id(inode)
      for key, _ in txn.get_range(sessions, sessions + b"\xff" * 40):
        txn.clear(key)
    run_transaction(self.engine, body)

  def exists(self, path: str) -> bool:
    try:
      self.stat(path)
      return True
    except (FileNotFoundError, NotADirectoryError):
      return False
