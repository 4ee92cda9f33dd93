"""The RPC transport over real loopback sockets: calls, concurrency, errors, and hostile frames."""

from __future__ import annotations

import asyncio
import errno
import struct

import msgpack
import pytest

from storage import transport
from storage.transport import ProtocolError, RpcClient, RpcServer, StorageError


async def _echo(data: bytes = b"", delay: float = 0.0):
  await asyncio.sleep(delay)
  return {"data": data, "size": len(data)}


async def _fail(kind: str):
  raise {"nf": FileNotFoundError("no such file: /x"), "ex": FileExistsError("/x exists"),
         "dir": IsADirectoryError("/d is a directory"), "val": ValueError("bad offset"),
         "other": StorageError("chain version 3 is stale, latest is 4", "stale_chain"),
         "full": OSError(errno.ENOSPC, "no space left on target 3")}[kind]


def _run(body):
  async def main():
    server = await RpcServer({"echo": _echo, "fail": _fail}).start()
    try:
      await body(server)
    finally:
      await server.stop()
  loop = transport.new_event_loop()
  try:
    loop.run_until_complete(asyncio.wait_for(main(), 30))
  finally:
    loop.close()


def test_round_trip_and_concurrent_calls():
  async def body(server):
    client = RpcClient(server.address)
    assert await client.call("echo", data=b"\x00\xffbytes") == {"data": b"\x00\xffbytes", "size": 7}
    # slow first, fast second: replies are matched by id, not order
    slow = asyncio.ensure_future(client.call("echo", data=b"slow", delay=0.2))
    assert (await client.call("echo", data=b"fast"))["data"] == b"fast" and not slow.done()
    assert (await slow)["data"] == b"slow"
    results = await asyncio.gather(*[client.call("echo", data=bytes([i])) for i in range(50)])
    assert [r["data"] for r in results] == [bytes([i]) for i in range(50)]
    await client.close()
  _run(body)


@pytest.mark.parametrize("kind,error,match", [
    ("nf", FileNotFoundError, "no such file"), ("ex", FileExistsError, "exists"),
    ("dir", IsADirectoryError, "is a directory"), ("val", ValueError, "bad offset"),
    ("other", StorageError, "chain version 3 is stale"), ("full", OSError, "no space left")])
def test_errors_arrive_as_the_right_python_exception(kind, error, match):
  async def body(server):
    client = RpcClient(server.address)
    with pytest.raises(error, match=match) as raised:
      await client.call("fail", kind=kind)
    assert transport.is_remote(raised.value)  # the peer's answer: not retried as an outage
    if kind == "full":
      assert raised.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="unknown method 'nope'"):
      await client.call("nope")
    assert (await client.call("echo"))["size"] == 0  # the connection survives errors
    await client.close()
  _run(body)


async def _raw_exchange(server, payload: bytes) -> bytes:
  reader, writer = await asyncio.open_connection(server.host, server.port)
  writer.write(payload)
  await writer.drain()
  writer.write_eof()  # a truncated frame is only known to be truncated at the end of the stream
  reply = await asyncio.wait_for(reader.read(), 10)
  writer.close()
  return reply


@pytest.mark.parametrize("payload,match", [
    (struct.pack(">I", transport.MAX_FRAME_BYTES + 1), "exceeds"),
    (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "malformed"),
    (struct.pack(">I", 2) + msgpack.packb([1]), "must hold a map"),
    (struct.pack(">I", 100) + b"abc", "truncated frame"),
    (b"\x00\x00", "truncated frame header"),
])
def test_hostile_frames_get_an_error_and_the_server_keeps_serving(payload, match):
  async def body(server):
    reply = await _raw_exchange(server, payload)
    message = msgpack.unpackb(reply[4:], raw=False)
    assert not message["ok"] and message["error"]["kind"] == "protocol" and match in message["error"]["message"]
    client = RpcClient(server.address)
    assert (await client.call("echo", data=b"still here"))["data"] == b"still here"
    await client.close()
  _run(body)


def test_oversized_outgoing_message_and_bad_address():
  with pytest.raises(ValueError, match="frame limit"):
    transport.pack({"data": bytes(transport.MAX_FRAME_BYTES + 1)})
  with pytest.raises(ValueError, match="HOST:PORT"):
    RpcClient("localhost")


def test_calls_to_a_dead_server_fail_fast():
  async def body(server):
    client = RpcClient(server.address, timeout_s=5)
    await client.call("echo")
    await server.stop()  # also ends the open connection
    with pytest.raises((ConnectionError, ProtocolError, TimeoutError, OSError)):
      await client.call("echo", delay=0)
      await client.call("echo", delay=0)  # the first may still be answered by a closing connection
  _run(body)


def test_a_handler_losing_its_own_connection_still_answers():
  async def downstream_gone():
    raise ConnectionRefusedError("successor at 127.0.0.1:1 refused the connection")

  async def main():
    server = await RpcServer({"forward": downstream_gone}).start()
    client = RpcClient(server.address, timeout_s=5)
    with pytest.raises(StorageError, match="refused") as err:
      await client.call("forward")
    assert err.value.kind == "unavailable"  # clients retry this kind
    await client.close()
    await server.stop()
  loop = transport.new_event_loop()
  try:
    loop.run_until_complete(asyncio.wait_for(main(), 10))
  finally:
    loop.close()
