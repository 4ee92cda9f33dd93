"""Batched reads into one preallocated buffer, modelled on 3FS's USRBIO `Ior`/`Iov`.

  ring = IoRing(client, buffer, entries=1024)       # buffer: numpy uint8 array, bytearray or memoryview
  for i, (path, offset) in enumerate(requests):
    ring.prepare(path, offset, 4096, buffer_offset=i * 4096, userdata=i)
  ring.submit()                                       # every read starts now, all chains busy at once
  for done in ring.wait():                            # Completion(result=bytes read or -errno, userdata)
    ...

Reads of different chunks run concurrently over the client's multiplexed connections, so one
call keeps every chain busy. A read past the end of a file is short; a failed read reports a
negative errno, like `hf3fs_wait_for_ios`.
"""

from __future__ import annotations

import asyncio
import errno
import queue
import time
from typing import Any, NamedTuple

from storage.client import Client, _to_stat


class Completion(NamedTuple):
  result: int  # bytes read, or -errno
  userdata: Any


class _Request(NamedTuple):
  path: str
  offset: int
  length: int
  buffer_offset: int
  userdata: Any


class IoRing:
  """A ring of up to `entries` prepared reads into `buffer`; not thread-safe (one ring per thread)."""

  def __init__(self, client: Client, buffer, entries: int = 1024):
    if entries < 1:
      raise ValueError(f"entries must be positive, got {entries}")
    self.client = client
    self.view = memoryview(buffer).cast("B")
    self.entries = entries
    self._prepared: list[_Request] = []
    self._done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
    self._in_flight = 0

  def prepare(self, path: str, offset: int, length: int, buffer_offset: int, userdata: Any = None) -> int:
    """Queues a read of `length` bytes at `offset` of `path` into `buffer[buffer_offset:]`; returns its slot."""
    if len(self._prepared) + self._in_flight >= self.entries:
      raise ValueError(f"the ring holds {self.entries} entries; wait for completions first")
    if offset < 0 or length < 0 or buffer_offset < 0 or buffer_offset + length > len(self.view):
      raise ValueError(f"read of {length} bytes at buffer offset {buffer_offset} does not fit the "
                       f"{len(self.view)}-byte buffer (or a negative offset)")
    self._prepared.append(_Request(path, offset, length, buffer_offset, userdata))
    return len(self._prepared) - 1

  def submit(self) -> int:
    """Starts every prepared read; returns how many."""
    requests, self._prepared = self._prepared, []
    self._in_flight += len(requests)
    asyncio.run_coroutine_threadsafe(self._run(requests), self.client._loop)
    return len(requests)

  async def _run(self, requests: list[_Request]) -> None:
    stats: dict[str, Any] = {}

    async def one(request: _Request) -> None:
      try:
        if request.path not in stats:
          stats[request.path] = asyncio.ensure_future(self.client._meta_call_async("stat", path=request.path))
        stat = _to_stat(await stats[request.path])
        if stat.is_dir:
          raise IsADirectoryError(request.path)
        length = max(0, min(request.length, stat.size - request.offset))
        data = await self.client._read(stat, request.offset, length) if length else b""
        self.view[request.buffer_offset:request.buffer_offset + len(data)] = data
        self._done.put(Completion(len(data), request.userdata))
      except Exception as err:  # reported per read, as an errno
        code = {FileNotFoundError: errno.ENOENT, IsADirectoryError: errno.EISDIR, ValueError: errno.EINVAL}
        self._done.put(Completion(-next((c for t, c in code.items() if isinstance(err, t)), errno.EIO),
                                  request.userdata))

    await asyncio.gather(*(one(r) for r in requests))

  def wait(self, min_results: int | None = None, timeout: float | None = None) -> list[Completion]:
    """Returns at least `min_results` completions (default: every read in flight), or fewer on timeout."""
    wanted = self._in_flight if min_results is None else min(min_results, self._in_flight)
    deadline = None if timeout is None else time.monotonic() + timeout
    out: list[Completion] = []
    while len(out) < wanted:
      remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
      try:
        out.append(self._done.get(timeout=remaining))
      except queue.Empty:
        break
    while True:  # whatever else has already finished
      try:
        out.append(self._done.get_nowait())
      except queue.Empty:
        break
    self._in_flight -= len(out)
    return out
