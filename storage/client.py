"""The Python client: files on a storage cluster, with the feel of local files.

  client = storage.connect("HOST:PORT")        # the mgmtd address
  with client.open("/data/file", "wb") as f: f.write(data)
  with client.open("/data/file", "rb") as f: data = f.read()

Metadata goes to a meta server (found through mgmtd); data goes straight to the chains, which
the client computes itself from the file's layout (chunk i on `chains[i % stripe]`), so meta is
off the data path, as in 3FS. Writes go to a chain's head; reads to any serving replica, in
turn. Routing changes are pushed by mgmtd (`storage.cluster.routing`); a request to a replica its
chain has left is abandoned, and a stale chain version, a replica that stopped serving, or a lost
connection refreshes the routing and retries (bounded, `storage.cluster.chain_client`); a write in flight ("pending") is waited out; a corrupted replica
is skipped for another. The client runs its own event loop in a thread, so its API is plain
blocking calls that notebooks and scripts can use.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from typing import Any, NamedTuple, Sequence

from storage.cluster.chain_client import ChainClient
from storage.cluster.routing import RoutingWatcher
from storage.transport import RpcClient, StorageError, new_event_loop

_ATTEMPTS = 200
_BACKOFF_S = 0.02
_WRITE_AHEAD_CHUNKS = 8


class FileStat(NamedTuple):
  inode: int
  is_dir: bool
  size: int
  mode: int
  mtime: float
  chunk_size: int | None
  chains: tuple[int, ...] | None


def _to_stat(value: dict) -> FileStat:
  layout = value.get("layout")
  return FileStat(value["inode"], value["is_dir"], value["size"], value["mode"], value["mtime"],
                  layout["chunk_size"] if layout else None, tuple(layout["chains"]) if layout else None)


class Client:
  """A connection to one cluster; thread-safe; close it (or use `with`) to free its thread."""

  def __init__(self, address: str, *, timeout_s: float = 30.0):
    self._owner = os.getpid()  # a forked child has no copy of the client's thread
    self._closed = False
    self._loop = new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="storage-client", daemon=True)
    self._thread.start()
    self.timeout_s = timeout_s
    async def watch():  # created on the client's loop: routing changes are pushed to it
      watcher = RoutingWatcher(address)
      await watcher.refresh()
      return watcher.start()
    self._watcher = self._run(watch())
    self._chains = ChainClient(self._watcher, timeout_s=timeout_s, attempts=_ATTEMPTS, backoff_s=_BACKOFF_S)
    deadline = time.monotonic() + timeout_s
    while not self.routing["meta"]:
      if time.monotonic() > deadline:
        raise StorageError(f"no meta server registered with mgmtd at {address}")
      time.sleep(0.1)
      self._run(self._watcher.refresh())
    self._meta = RpcClient(self.routing["meta"][0], timeout_s=timeout_s)

  @property
  def routing(self) -> dict[str, Any]:
    """The latest routing mgmtd pushed (nodes, chains with target states, meta servers)."""
    return self._watcher.routing

  def _usable(self) -> bool:
    return not self._closed and self._owner == os.getpid() and self._thread.is_alive()

  def _run(self, coro):
    if not self._usable():
      coro.close()
      raise ValueError("this storage client is closed, or was inherited through fork (its thread stayed in "
                       "the parent): connect a new one")
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

  def close(self) -> None:
    """Closes the connections and stops the client's thread; later calls raise ValueError. Idempotent."""
    if not self._usable():
      return
    async def shut():
      await self._watcher.close()
      await self._chains.close()
      await self._meta.close()
    try:
      self._run(shut())
    finally:
      self._closed = True
      self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=5)

  def __enter__(self) -> "Client":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- namespace --
  def _meta_call(self, method: str, **args):
    return self._run(self._meta_call_async(method, **args))

  async def _meta_call_async(self, method: str, **args):
    """One meta RPC; if that server is gone, fail over to another one mgmtd knows (meta is stateless)."""
    for attempt in range(_ATTEMPTS):
      try:
        return await self._meta.call(method, **args)
      except (ConnectionError, TimeoutError):  # not OSError: FileNotFoundError is an answer, not an outage
        if attempt == _ATTEMPTS - 1:
          raise
      await asyncio.sleep(_BACKOFF_S * min(attempt + 1, 10))
      try:
        await self._refresh()
      except (ConnectionError, OSError, TimeoutError):
        continue
      current = f"{self._meta.host}:{self._meta.port}"
      others = [m for m in self.routing["meta"] if m != current] or self.routing["meta"]
      if others and others[0] != current:
        await self._meta.close()
        self._meta = RpcClient(others[0], timeout_s=self.timeout_s)

  def stat(self, path: str) -> FileStat:
    return _to_stat(self._meta_call("stat", path=path))

  def listdir(self, path: str = "/") -> list[str]:
    return self._meta_call("listdir", path=path)

  def mkdir(self, path: str, *, parents: bool = False, exist_ok: bool = False) -> FileStat:
    return _to_stat(self._meta_call("mkdir", path=path, parents=parents, exist_ok=exist_ok))

  def rename(self, src: str, dst: str) -> None:
    self._meta_call("rename", src=src, dst=dst)

  def remove(self, path: str) -> None:
    """Removes a file. Its chunks are reclaimed by the meta server after a grace period, and
    after that a reader that still holds it open gets FileNotFoundError."""
    self._meta_call("unlink", path=path)

  def truncate(self, path: str, length: int) -> FileStat:
    """Sets a file's length: bytes past it are dropped from storage; growing reads as zeros."""
    return _to_stat(self._meta_call("truncate", path=path, length=length))

  def rmdir(self, path: str) -> None:
    self._meta_call("rmdir", path=path)

  def exists(self, path: str) -> bool:
    try:
      self.stat(path)
      return True
    except (FileNotFoundError, NotADirectoryError):
      return False

  def open(self, path: str, mode: str = "rb", buffering: int = -1):
    """A binary file: "rb" or "wb" (truncating).

    "rb" gives an io.BufferedReader of one chunk, for one thread; with `buffering=0` it gives
    the unbuffered reader itself, which several threads may share (see `SharedReader`).
    "wb" gives an io.BufferedWriter of several chunks (`buffering` is ignored).
    """
    if mode not in ("rb", "wb"):
      raise ValueError(f"mode must be 'rb' or 'wb', got {mode!r}")
    if mode == "rb":
      stat = self.stat(path)
      if stat.is_dir:
        raise IsADirectoryError(f"is a directory: {path}")
      reader = SharedReader(self, path, stat)
      return reader if buffering == 0 else io.BufferedReader(reader, buffer_size=stat.chunk_size)
    stat = _to_stat(self._meta_call("create", path=path, truncate=True))
    session = self._meta_call("open_session", inode=stat.inode)
    # A buffer of several chunks: each flush writes them concurrently (different chunks, or chains).
    buffer_size = stat.chunk_size * max(_WRITE_AHEAD_CHUNKS, len(stat.chains))
    return io.BufferedWriter(_Writer(self, path, stat, session), buffer_size=buffer_size)

  def create(self, path: str, *, exclusive: bool = False, truncate: bool = True) -> FileStat:
    """Creates a file (or opens an existing one: FileExistsError only when `exclusive`); its stat."""
    return _to_stat(self._meta_call("create", path=path, exclusive=exclusive, truncate=truncate))

  def write_at(self, writes: Sequence[tuple[FileStat, int, bytes]]) -> None:
    """Writes several (file stat, offset, data) ranges at once, all chains busy together.

    For files laid out in place (a preallocated cache or table): every range must lie within its
    file's length in the stat, which this does not change (there is no write session).
    """
    for stat, offset, data in writes:
      if offset < 0 or offset + len(data) > stat.size:
        raise ValueError(f"writes must lie within the file's {stat.size} bytes, got {len(data)} at {offset}")
    async def all_of():
      await asyncio.gather(*(self._write(stat, offset, data) for stat, offset, data in writes))
    self._run(all_of())

  def pread(self, path: str, offset: int, length: int) -> bytes:
    if offset < 0 or length < 0:
      raise ValueError(f"offset and length must be >= 0, got {offset} and {length}")
    stat = self.stat(path)
    end = min(stat.size, offset + length)
    return self._run(self._read(stat, offset, max(end - offset, 0)))

  # -- data path --
  async def _refresh(self) -> None:
    await self._watcher.refresh()

  async def _write_chunk(self, stat: FileStat, index: int, offset: int, data: bytes) -> None:
    await self._chains.call_head(stat.chains[index % len(stat.chains)], "write", chunk=[stat.inode, index],
                                 offset=offset, data=data)

  async def _read_chunk(self, stat: FileStat, index: int, offset: int, length: int) -> bytes:
    reply = await self._chains.call_replica(stat.chains[index % len(stat.chains)], "read", chunk=[stat.inode, index],
                                            offset=offset, length=length)
    data = reply["data"]
    return data + bytes(length - len(data))  # a hole or short chunk reads as zeros

  async def _read(self, stat: FileStat, offset: int, length: int) -> bytes:
    pieces = []
    size = stat.chunk_size
    position, end = offset, offset + length
    while position < end:
      index, within = divmod(position, size)
      take = min(size - within, end - position)
      pieces.append(self._read_chunk(stat, index, within, take))
      position += take
    return b"".join(await asyncio.gather(*pieces))  # chunks on different chains are read in parallel

  async def _write(self, stat: FileStat, offset: int, data: bytes) -> None:
    size = stat.chunk_size
    pieces, position = [], 0
    while position < len(data):
      index, within = divmod(offset + position, size)
      take = min(size - within, len(data) - position)
      pieces.append(self._write_chunk(stat, index, within, data[position:position + take]))
      position += take
    await asyncio.gather(*pieces)


class SharedReader(io.RawIOBase):
  """An unbuffered-looking, seekable reader of one file, safe to share between threads.

  DuckDB (through fsspec) reads one handle from several threads as `seek(x)` then `read(n)`
  pairs, and a read here waits on the network without the GIL, so another thread's seek can
  land in between. A thread's seek is therefore remembered for that thread, and its next read
  starts there. A read by a thread that did not seek continues the shared position (sequential
  reads handed between threads, as pyarrow's stream readers do) and forgets the other threads'
  seeks. Used by one thread, this is an ordinary file. Mixing threads that seek with threads
  that read without seeking, at the same time, has no well-defined position (as on any shared
  file); `pread` is positional and always safe.

  Reads of different threads run concurrently. A read shorter than `READ_AHEAD` fetches that
  much and keeps it for the same thread's next small reads and `readline` (one block per
  thread, at most `_MAX_BLOCKS` threads); larger reads fetch exactly. The size is the file's at
  open, and kept blocks are not refreshed if the file is rewritten while open.
  """

  READ_AHEAD = 64 << 10
  _MAX_BLOCKS = 64

  def __init__(self, client: Client, path: str, stat: FileStat):
    self._client, self.name, self._stat = client, path, stat
    self._lock = threading.Lock()
    self._shared = 0
    self._sought: dict[int, int] = {}  # thread ident -> its seek not yet read from
    self._blocks: dict[int, tuple[int, bytes]] = {}  # thread ident -> (offset, bytes) read ahead

  @property
  def size(self) -> int:
    return self._stat.size

  def readable(self) -> bool:
    self._check_open()
    return True

  def seekable(self) -> bool:
    self._check_open()
    return True

  def tell(self) -> int:
    self._check_open()
    with self._lock:
      return self._sought.get(threading.get_ident(), self._shared)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self._check_open()
    if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
      raise ValueError(f"whence must be SEEK_SET, SEEK_CUR or SEEK_END, got {whence!r}")
    with self._lock:
      me = threading.get_ident()
      base = {io.SEEK_SET: 0, io.SEEK_CUR: self._sought.get(me, self._shared), io.SEEK_END: self.size}[whence]
      if base + offset < 0:
        raise ValueError(f"negative seek position {base + offset}")
      self._sought[me] = self._shared = base + offset
      return base + offset

  def _start(self) -> int:
    """Where this thread's next read starts (call with the lock held)."""
    me = threading.get_ident()
    if me in self._sought:
      return self._sought.pop(me)
    self._sought.clear()  # the position was handed over: older seeks of other threads are void
    return self._shared

  def pread(self, offset: int, length: int) -> bytes:
    """Up to `length` bytes at `offset`, whatever the position (which this leaves alone)."""
    self._check_open()
    if offset < 0 or length < 0:
      raise ValueError(f"offset and length must be >= 0, got {offset} and {length}")
    return self._fetch(offset, max(0, min(length, self.size - offset)))

  def _kept(self, start: int) -> bytes:
    """This thread's read-ahead bytes from `start` on (empty when its block does not hold `start`)."""
    kept = self._blocks.get(threading.get_ident())
    if kept and kept[0] <= start < kept[0] + len(kept[1]):
      return kept[1][start - kept[0]:]
    return b""

  def _read_ahead(self, start: int) -> bytes:
    """Fetches `READ_AHEAD` bytes at `start` (fewer at the end) and keeps them for this thread."""
    block = self._client._run(self._client._read(self._stat, start, min(self.READ_AHEAD, self.size - start)))
    me = threading.get_ident()
    with self._lock:
      if me not in self._blocks and len(self._blocks) >= self._MAX_BLOCKS:
        self._blocks.pop(next(iter(self._blocks)))  # the oldest thread's block
      self._blocks[me] = (start, block)
    return block

  def _fetch(self, start: int, length: int) -> bytes:
    """`length` bytes at `start` (within the file), from this thread's block or the cluster."""
    kept = self._kept(start)
    if len(kept) >= length:
      return kept[:length]
    if length >= self.READ_AHEAD:
      return self._client._run(self._client._read(self._stat, start, length))
    return self._read_ahead(start)[:length]

  def readinto(self, buffer) -> int:
    self._check_open()
    view = memoryview(buffer).cast("B")  # bytes, whatever the buffer's item size or shape
    with self._lock:
      start = self._start()
      length = max(0, min(len(view), self.size - start))
      self._shared = start + length  # reserved: a sequential reader in another thread continues after it
    view[:length] = self._fetch(start, length)
    return length

  def readall(self) -> bytes:
    self._check_open()
    with self._lock:
      start = self._start()
      self._shared = self.size
    return self._fetch(start, max(0, self.size - start))

  def readline(self, size: int | None = -1) -> bytes:
    self._check_open()
    limit = self.size if size is None or size < 0 else size
    with self._lock:
      position = self._start()
    line = bytearray()
    while len(line) < limit and position < self.size:
      block = (self._kept(position) or self._read_ahead(position))[:limit - len(line)]
      end = block.find(b"\n")
      block = block if end < 0 else block[:end + 1]
      line += block
      position += len(block)
      if end >= 0:
        break
    with self._lock:
      self._shared = position
    return bytes(line)

  def _check_open(self) -> None:
    if self.closed:
      raise ValueError("I/O operation on closed file")

  def close(self) -> None:
    self._blocks.clear()
    super().close()


class _Writer(io.RawIOBase):
  """The raw side of a file open for writing; its length goes to the meta server on close."""

  def __init__(self, client: Client, path: str, stat: FileStat, session: str):
    self._client, self.name, self._stat, self._session = client, path, stat, session
    self._position = 0
    self._length = 0

  def writable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._position

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
      raise ValueError(f"whence must be SEEK_SET, SEEK_CUR or SEEK_END, got {whence!r}")
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
    if base + offset < 0:
      raise ValueError(f"negative seek position {base + offset}")
    self._position = base + offset
    return self._position

  def write(self, data) -> int:
    data = bytes(data)
    self._client._run(self._client._write(self._stat, self._position, data))
    self._position += len(data)
    self._length = max(self._length, self._position)
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._client._meta_call("close_session", inode=self._stat.inode, session=self._session, length=self._length)
    super().close()


def connect(address: str, **kwargs) -> Client:
  """A client of the cluster whose mgmtd listens at `address` ("HOST:PORT")."""
  return Client(address, **kwargs)
