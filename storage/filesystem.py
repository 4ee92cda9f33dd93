"""fsspec for the storage cluster: protocol `3fs`, so pandas, pyarrow and DuckDB read and write it.

  import fsspec
  with fsspec.open("3fs://127.0.0.1:9000/data/x.parquet", "wb") as f: ...
  fs = fsspec.filesystem("3fs", address="127.0.0.1:9000")   # or from any 3fs:// URL
  fs.ls("/data"); fs.info("/data/x.parquet"); fs.mv("/data/a", "/data/b"); fs.rm("/data", recursive=True)

The URL's netloc is mgmtd's address, as `python -m storage cluster` prints it; paths are the
cluster's absolute paths. Registered through the `fsspec.specs` entry point (pyproject.toml).
`mv` is the meta server's atomic rename (a file or a whole directory, in one transaction), not
fsspec's copy and delete. Files open as "rb" (seekable and unbuffered: each read is one batch of
chunk reads, and a handle may be shared between threads, as DuckDB does; see
`storage.client.SharedReader`) or "wb" (truncating, written chunk-striped through the chains);
fsspec adds text modes on top.
"""

from __future__ import annotations

import atexit
import os
import posixpath
import re
import shutil
import threading

import fsspec

import storage


class _ClientPool:
  """One `storage.Client` per (address, timeout), shared by every filesystem instance using it.

  fsspec caches instances per thread, so without this each thread would open its own client
  (an event-loop thread and connections); the client is thread-safe, so one serves them all.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._clients: dict[tuple[str, float], list] = {}  # key -> [client, users]

  def acquire(self, address: str, timeout_s: float) -> storage.Client:
    with self._lock:
      entry = self._clients.get((address, timeout_s))
      if entry is None:
        entry = self._clients[(address, timeout_s)] = [storage.connect(address, timeout_s=timeout_s), 0]
      entry[1] += 1
      return entry[0]

  def release(self, address: str, timeout_s: float) -> None:
    with self._lock:
      entry = self._clients.get((address, timeout_s))
      if entry is None:  # already closed by close_all (at exit)
        return
      entry[1] -= 1
      if entry[1] == 0:
        del self._clients[(address, timeout_s)]
        entry[0].close()

  def forget(self) -> None:
    """In a forked child: the parent's clients have no thread here, so new instances connect anew."""
    self._lock = threading.Lock()
    self._clients = {}


  def close_all(self) -> None:
    """At exit: closes every client still open, so its event loop's tasks end cleanly."""
    with self._lock:
      entries, self._clients = list(self._clients.values()), {}
    for client, _ in entries:
      try:
        client.close()
      except Exception:  # noqa: BLE001 -- a cluster already gone at exit: nothing left to close
        pass


_SHARED_CLIENTS = _ClientPool()
atexit.register(_SHARED_CLIENTS.close_all)
os.register_at_fork(after_in_child=_SHARED_CLIENTS.forget)
_GLOB = re.compile(r"[*?[]")  # fsspec's glob characters


def _has_glob(path) -> bool:
  return isinstance(path, str) and bool(_GLOB.search(path))


class StorageFileSystem(fsspec.AbstractFileSystem):
  """An fsspec filesystem over one cluster's `storage.Client`.

  Args:
    address: mgmtd's `host:port`; taken from the URL when fsspec builds the instance from one.
    timeout_s: the client's per-call timeout.
  """

  protocol = ("3fs",)
  root_marker = "/"

  def __init__(self, address: str | None = None, *, timeout_s: float = 30.0, **kwargs):
    super().__init__(**kwargs)
    if not address:
      raise ValueError("address (mgmtd's host:port) is required: fsspec.filesystem('3fs', address=...) or a "
                       "3fs://host:port/path URL")
    self.address = address
    self._client = _SHARED_CLIENTS.acquire(address, timeout_s)
    self._client_key = (address, timeout_s)

  @property
  def client(self) -> storage.Client:
    """The cluster client this instance shares; ValueError once `close` was called."""
    if self._client is None:
      raise ValueError(f"this 3fs filesystem ({self.address}) is closed: make a new one")
    return self._client

  @staticmethod
  def _split(url: str) -> tuple[str, str]:
    """`3fs://host:port/a/b` -> ("host:port", "/a/b"); a bare path has no address. (urllib does not
    parse a scheme that starts with a digit.)"""
    if not url.startswith("3fs://"):
      return "", url
    address, _, path = url[len("3fs://"):].partition("/")
    return address, "/" + path

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = cls._split(str(path))[1].strip("/")
    return "/" + path if path else "/"

  @classmethod
  def _get_kwargs_from_urls(cls, path):
    address = cls._split(str(path))[0]
    return {"address": address} if address else {}

  def _path(self, path) -> str:
    """The cluster path of `path`; ValueError when a URL names another cluster than this instance's."""
    address = self._split(str(path))[0]
    if address and address != self.address:
      raise ValueError(f"{path} is on cluster {address}, this filesystem is connected to {self.address}")
    return self._strip_protocol(path)

  def close(self) -> None:
    """Drops this instance from fsspec's cache, and closes the client when no other instance uses it."""
    if self._client_key is not None:
      _SHARED_CLIENTS.release(*self._client_key)
      self._client_key = self._client = None
    type(self)._cache.pop(self._fs_token, None)

  def unstrip_protocol(self, name: str) -> str:
    return f"3fs://{self.address}{self._strip_protocol(name)}"

  def _entry(self, path: str, stat) -> dict:
    return {"name": path, "size": 0 if stat.is_dir else stat.size, "type": "directory" if stat.is_dir else "file",
            "mtime": stat.mtime, "mode": stat.mode, "inode": stat.inode}

  def info(self, path, **kwargs):
    path = self._path(path)
    return self._entry(path, self.client.stat(path))  # FileNotFoundError names the path

  def ls(self, path, detail=True, **kwargs):
    path = self._path(path)
    stat = self.client.stat(path)
    if not stat.is_dir:
      entries = [self._entry(path, stat)]
    else:
      entries = []
      for name in sorted(self.client.listdir(path)):
        child = posixpath.join(path, name)
        try:
          entries.append(self._entry(child, self.client.stat(child)))
        except FileNotFoundError:  # removed between the listing and its stat
          continue
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
    if mode not in ("rb", "wb"):
      raise ValueError(f"mode must be 'rb' or 'wb' (fsspec adds text modes), got {mode!r}")
    if not autocommit:
      raise NotImplementedError("3fs files are visible as written: fsspec transactions are not supported")
    # Reads are unbuffered `SharedReader`s: DuckDB shares one handle between its threads.
    return self.client.open(self._path(path), mode, buffering=0 if mode == "rb" else -1)

  def cat_file(self, path, start=None, end=None, **kwargs):
    path = self._path(path)
    stat = self.client.stat(path)
    if stat.is_dir:
      raise IsADirectoryError(f"is a directory: {path}")
    size = stat.size
    start = 0 if start is None else (max(start + size, 0) if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else min(end, size))
    return self.client.pread(path, start, max(end - start, 0))

  def mkdir(self, path, create_parents=True, **kwargs):
    self.client.mkdir(self._path(path), parents=create_parents)

  def makedirs(self, path, exist_ok=False):
    self.client.mkdir(self._path(path), parents=True, exist_ok=exist_ok)

  def rm_file(self, path):
    self.client.remove(self._path(path))

  def rmdir(self, path):
    self.client.rmdir(self._path(path))

  def rm(self, path, recursive=False, maxdepth=None):
    if isinstance(path, (list, tuple)) or _has_glob(path) or maxdepth is not None:
      paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
      for p in sorted(paths, key=lambda p: p.count("/"), reverse=True):  # children before their directories
        if self.isdir(p):
          self.rmdir(p)
        else:
          self.rm_file(p)
      return
    path = self._path(path)
    if not self.client.stat(path).is_dir:
      self.client.remove(path)
    elif not recursive:
      raise IsADirectoryError(f"is a directory (pass recursive=True): {path}")
    else:
      self._rm_tree(path)

  def _rm_tree(self, path: str) -> None:
    for entry in self.ls(path, detail=True):  # the listing's types: no second stat per entry
      if entry["type"] == "directory":
        self._rm_tree(entry["name"])
      else:
        self.client.remove(entry["name"])
    self.client.rmdir(path)

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    """The meta server's atomic rename of a file or a whole directory (not a copy).

    Onto an existing directory, or with several sources (a list or a glob), or a `path2` ending
    in "/", sources move into the directory `path2` under their own names, one rename each (as
    `mv` and shutil.move do); `path2` must then exist.
    """
    if isinstance(path1, (list, tuple)) or _has_glob(path1) or str(path2).endswith("/"):
      sources = self.glob(path1) if _has_glob(path1) else (
          [path1] if isinstance(path1, str) else list(path1))
      target = self._path(path2)
      if not self.isdir(target):
        raise NotADirectoryError(f"moving {len(sources)} path(s) into {path2}, which is not a directory")
      for source in sources:
        source = self._path(source)
        self.client.rename(source, posixpath.join(target, posixpath.basename(source)))
      return
    source, target = self._path(path1), self._path(path2)
    if target != "/" and self.isdir(target) and source != target:  # like `mv` and shutil.move: into the directory
      target = posixpath.join(target, posixpath.basename(source))
    self.client.rename(source, target)

  def cp_file(self, path1, path2, **kwargs):
    """Copies one file's bytes (read and written through the client, 8 MiB at a time); a directory is made."""
    source, target = self._path(path1), self._path(path2)
    if self.isdir(source):  # fsspec's recursive copy passes directories too
      self.makedirs(target, exist_ok=True)
      return
    with self.client.open(source, "rb") as src, self.client.open(target, "wb") as dst:
      shutil.copyfileobj(src, dst, length=8 << 20)

  def modified(self, path):
    import datetime
    return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)
