"""The one module that moves bytes between storage processes: length-prefixed msgpack RPC over TCP.

3FS uses RDMA; here every service speaks this transport over asyncio TCP, so replacing it (with
RDMA, or shared memory on one host) touches this file only.

A frame is a 4-byte big-endian length and a msgpack map. A request is `{"id", "method", "args"}`;
a response is `{"id", "ok": True, "result"}` or `{"id", "ok": False, "error": {"kind", "message"}}`.
Calls on one connection are multiplexed by id and served concurrently. A malformed, truncated
or oversized frame gets an error response naming the problem and closes that connection; the
server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import struct
from typing import Any, Awaitable, Callable

import msgpack

MAX_FRAME_BYTES = (64 << 20) + (1 << 20)  # one 64 MiB chunk of data plus headers
MAX_IN_FLIGHT_PER_CONNECTION = 16  # requests served at once per connection; more wait unread
_HEADER = struct.Struct(">I")

Handler = Callable[..., Awaitable[Any]]


class StorageError(RuntimeError):
  """A storage service reported an error without a more specific Python type."""

  def __init__(self, message: str, kind: str = "storage"):
    super().__init__(message)
    self.kind = kind


class ProtocolError(StorageError):
  """A frame could not be read: malformed, truncated or oversized."""

  def __init__(self, message: str):
    super().__init__(message, "protocol")


# Python exceptions that cross the wire as themselves; anything else arrives as StorageError.
_KINDS: dict[str, type[Exception]] = {
    "not_found": FileNotFoundError,
    "exists": FileExistsError,
    "is_directory": IsADirectoryError,
    "not_directory": NotADirectoryError,
    "permission": PermissionError,
    "bad_request": ValueError,
    "timeout": TimeoutError,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_KIND_OF[TypeError] = "bad_request"  # wrong or missing arguments of an RPC


def error_payload(err: BaseException) -> dict:
  """How a server reports `err`: its kind (from the exception type) and message."""
  if isinstance(err, StorageError):
    return {"kind": err.kind, "message": str(err)}
  if isinstance(err, ConnectionError):  # a peer of the server is away: worth a retry by the caller
    return {"kind": "unavailable", "message": str(err) or type(err).__name__}
  kind = next((k for cls, k in _KIND_OF.items() if isinstance(err, cls)), "storage")
  if kind == "storage" and isinstance(err, OSError) and err.errno:  # e.g. ENOTEMPTY: an OSError with its errno
    return {"kind": "os", "errno": err.errno, "message": err.strerror or str(err)}
  return {"kind": kind, "message": str(err) or type(err).__name__}


def raise_error(error: dict) -> None:
  """Raises the Python exception a client should see for an error payload."""
  kind, message = error.get("kind", "storage"), error.get("message", "")
  if kind in _KINDS:
    err = _KINDS[kind](message)
  elif kind == "os" and isinstance(error.get("errno"), int):
    err = OSError(error["errno"], message)
  else:
    err = StorageError(message, kind)
  err.remote = True  # the peer's answer, not a failure to reach it (see `is_remote`)
  raise err


def is_remote(err: BaseException) -> bool:
  """Whether `err` is a peer's answer (raised by `raise_error`) rather than a local or network failure."""
  return getattr(err, "remote", False)


def pack(message: dict) -> bytes:
  body = msgpack.packb(message, use_bin_type=True)
  if len(body) > MAX_FRAME_BYTES:
    raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
  return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict | None:
  """The next message, or None at a clean end of stream; ProtocolError if it is not a valid frame."""
  try:
    header = await reader.readexactly(_HEADER.size)
  except asyncio.IncompleteReadError as err:
    if not err.partial:
      return None
    raise ProtocolError("truncated frame header") from None
  (length,) = _HEADER.unpack(header)
  if length > MAX_FRAME_BYTES:
    raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
  try:
    body = await reader.readexactly(length)
  except asyncio.IncompleteReadError:
    raise ProtocolError(f"truncated frame: expected {length} bytes") from None
  try:
    message = msgpack.unpackb(body, raw=False)
  except Exception as err:  # msgpack raises several types for bad input
    raise ProtocolError(f"malformed frame: {err}") from None
  if not isinstance(message, dict):
    raise ProtocolError(f"a frame must hold a map, got {type(message).__name__}")
  return message


class RpcServer:
  """Serves `handlers[method](**args)` (coroutines) on host:port."""

  def __init__(self, handlers: dict[str, Handler], host: str = "127.0.0.1", port: int = 0):
    self.handlers = handlers
    self.host, self.port = host, port
    self._server: asyncio.base_events.Server | None = None
    self._connections: set[asyncio.Task] = set()

  async def start(self) -> "RpcServer":
    self._server = await asyncio.start_server(self._serve, self.host, self.port)
    self.port = self._server.sockets[0].getsockname()[1]
    return self

  async def stop(self) -> None:
    if self._server is not None:
      self._server.close()
      for task in list(self._connections):  # open connections end with the server
        task.cancel()
      await asyncio.gather(*self._connections, return_exceptions=True)
      await self._server.wait_closed()

  @property
  def address(self) -> str:
    return f"{self.host}:{self.port}"

  async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    me = asyncio.current_task()
    self._connections.add(me)
    me.add_done_callback(self._connections.discard)
    lock = asyncio.Lock()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
    tasks: set[asyncio.Task] = set()

    async def reply(message: dict) -> None:
      async with lock:
        writer.write(pack(message))
        await writer.drain()

    async def handle(request: dict) -> None:
      try:
        await serve_one(request)
      finally:
        slots.release()  # also when cancelled: a leaked slot would stall this connection for good

    async def serve_one(request: dict) -> None:
      request_id = request.get("id", 0)
      method, args = request.get("method"), request.get("args", {})
      try:
        if method not in self.handlers:
          raise StorageError(f"unknown method {method!r}", "bad_request")
        if not isinstance(args, dict):
          raise StorageError("args must be a map", "bad_request")
        message = {"id": request_id, "ok": True, "result": await self.handlers[method](**args)}
      except asyncio.CancelledError:
        raise
      except Exception as err:  # report every failure, a lost connection downstream included
        expected = isinstance(err, OSError) and err.errno == errno.ENOTEMPTY  # an answer, e.g. rmdir of a full directory
        if not expected and not isinstance(err, (StorageError, ConnectionError, *_KIND_OF)):
          logging.exception("storage rpc %s failed", method)
        message = {"id": request_id, "ok": False, "error": error_payload(err)}
      try:
        await reply(message)
      except ConnectionError:
        pass  # the caller is gone

    try:
      while True:
        try:
          request = await read_frame(reader)
        except ProtocolError as err:
          await reply({"id": 0, "ok": False, "error": error_payload(err)})
          break
        if request is None:
          break
        await slots.acquire()  # bounded work per connection: reading pauses when it is full
        task = asyncio.create_task(handle(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    except (ConnectionError, asyncio.CancelledError):
      pass  # a closed peer, or the server stopping: this connection simply ends
    finally:
      for task in tasks:
        task.cancel()
      writer.close()


class RpcClient:
  """One multiplexed connection to an `RpcServer`; `await client.call("method", **args)`."""

  def __init__(self, address: str, *, timeout_s: float = 30.0):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"address must be HOST:PORT, got {address!r}")
    self.host, self.port, self.timeout_s = host, int(port), timeout_s
    self._ids = itertools.count(1)
    self._pending: dict[int, asyncio.Future] = {}
    self._writer: asyncio.StreamWriter | None = None
    self._reader_task: asyncio.Task | None = None
    self._lock = asyncio.Lock()
    self._closed = False

  async def _connect(self) -> None:
    reader, self._writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout_s)
    self._reader_task = asyncio.create_task(self._read_replies(reader))

  async def _read_replies(self, reader: asyncio.StreamReader) -> None:
    error: BaseException = ConnectionError(f"connection to {self.host}:{self.port} closed")
    try:
      while (message := await read_frame(reader)) is not None:
        future = self._pending.pop(message.get("id"), None)
        if future is not None and not future.done():
          future.set_result(message)
    except (ProtocolError, ConnectionError) as err:
      error = err
    finally:
      for future in self._pending.values():
        if not future.done():
          future.set_exception(error)
      self._pending.clear()
      self._writer = None

  async def call(self, method: str, **args) -> Any:
    """Sends one request and returns its result, or raises the server's error as a Python exception."""
    async with self._lock:
      if self._closed:
        raise ConnectionError(f"the client of {self.host}:{self.port} is closed")
      if self._writer is None:
        await self._connect()
        if self._closed:  # closed while connecting
          await self.close()
          raise ConnectionError(f"the client of {self.host}:{self.port} is closed")
      request_id = next(self._ids)
      future = asyncio.get_running_loop().create_future()
      self._pending[request_id] = future
      self._writer.write(pack({"id": request_id, "method": method, "args": args}))
      await self._writer.drain()
    try:
      reply = await asyncio.wait_for(future, self.timeout_s)
    except asyncio.TimeoutError:
      raise TimeoutError(f"{method} to {self.host}:{self.port} timed out after {self.timeout_s} s") from None
    finally:
      self._pending.pop(request_id, None)  # timed out or cancelled: a late reply is dropped
    if not reply.get("ok"):
      raise_error(reply.get("error", {}))
    return reply.get("result")

  async def close(self) -> None:
    """Closes the connection for good (later calls raise ConnectionError), without waiting on
    the peer, which may be gone or stuck."""
    self._closed = True
    if self._writer is not None:
      self._writer.close()
    if self._reader_task is not None:
      self._reader_task.cancel()
      await asyncio.gather(self._reader_task, return_exceptions=True)
    for future in self._pending.values():  # a reader cancelled before it ran never failed them
      if not future.done():
        future.set_exception(ConnectionError(f"connection to {self.host}:{self.port} was closed by this client"))
    self._pending.clear()
    self._writer = None


def new_event_loop() -> asyncio.AbstractEventLoop:
  """uvloop's loop when it is installed (faster sockets), else asyncio's."""
  try:
    import uvloop
  except ImportError:
    return asyncio.new_event_loop()
  return uvloop.new_event_loop()
