"""CRAQ on real loopback sockets: three storage nodes and mgmtd in one event loop.

Writes go to the head and are committed along the chain; reads from any serving replica agree;
a stale chain version is refused; a crashed node is reconfigured out, writes go on, and when it
returns it is resynced before it serves again. (A node cut off from mgmtd is tested with real
processes in test_faults.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from storage import transport
from storage.chunks import ChunkId
from storage.cluster.mgmtd import Mgmtd
from storage.node import StorageNode
from storage.transport import RpcClient, RpcServer, StorageError

LEASE_S = 2.0  # generous: a busy 2-core CI machine must not miss heartbeats by accident


async def _start(tmp_path, nodes=3):
  mgmtd = Mgmtd(tmp_path / "mgmtd", lease_s=LEASE_S)
  server = await RpcServer(mgmtd.handlers).start()
  scanner = asyncio.create_task(mgmtd.run_scanner())
  storage = [await StorageNode(tmp_path / f"node{i}", server.address).start() for i in range(nodes)]
  await mgmtd.create_chain_table(3)
  for node in storage:
    await node.refresh_routing()
  return mgmtd, server, scanner, storage


async def _stop(mgmtd, server, scanner, storage):
  scanner.cancel()
  for node in storage:
    await node.stop()
  await server.stop()
  mgmtd.close()


async def _routing(server):
  client = RpcClient(server.address)
  routing = await client.call("get_routing")
  await client.close()
  return routing


async def _until(predicate, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while not await predicate():
    if time.monotonic() > deadline:
      raise TimeoutError("condition not reached")
    await asyncio.sleep(0.05)


async def _write(routing, chain_id, chunk, offset, data):
  chain = next(c for c in routing["chains"] if c["chain_id"] == chain_id)
  head = StorageNode.write_path(chain)[0]
  address = next(n["address"] for n in routing["nodes"].values() if head in n["targets"])
  client = RpcClient(address)
  try:
    return await client.call("write", chain_id=chain_id, chain_version=chain["version"], target=head,
                             chunk=list(chunk), offset=offset, data=data)
  finally:
    await client.close()


async def _read_all(routing, chain_id, chunk):
  chain = next(c for c in routing["chains"] if c["chain_id"] == chain_id)
  out = {}
  for target, public, _ in chain["targets"]:
    if public != "serving":
      continue
    address = next(n["address"] for n in routing["nodes"].values() if target in n["targets"])
    client = RpcClient(address)
    out[target] = (await client.call("read", chain_id=chain_id, chain_version=chain["version"], target=target,
                                     chunk=list(chunk)))["data"]
    await client.close()
  return out


def _run(body, tmp_path):
  async def main():
    cluster = await _start(tmp_path)
    try:
      await body(*cluster)
    finally:
      await _stop(*cluster)
  loop = transport.new_event_loop()
  try:
    loop.run_until_complete(asyncio.wait_for(main(), 60))
  finally:
    loop.close()


CHUNK = ChunkId(7, 0)


def test_writes_commit_along_the_chain_and_every_replica_reads_them(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    assert (await _write(routing, 1, CHUNK, 0, b"hello chain"))["version"] == 1
    assert (await _write(routing, 1, CHUNK, 6, b"CRAQ!"))["version"] == 2
    replicas = await _read_all(routing, 1, CHUNK)
    assert len(replicas) == 3 and set(replicas.values()) == {b"hello CRAQ!"}
    chain = routing["chains"][0]
    stale = dict(chain, version=chain["version"] - 1)
    with pytest.raises(StorageError, match="stale"):
      await _write({**routing, "chains": [stale]}, 1, CHUNK, 0, b"x")
    # a write in flight answers reads with "pending"
    target = chain["targets"][-1][0]
    owner = next(n for n in storage if target in n.stores)
    owner.stores[target].prepare(CHUNK, 0, b"in flight", chain["version"])
    with pytest.raises(StorageError, match="write in flight"):
      await _read_all(routing, 1, CHUNK)
    owner.stores[target].abort(CHUNK)
  _run(body, tmp_path)


def test_crash_reconfigure_continue_and_resync(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    await _write(routing, 1, CHUNK, 0, b"before the crash")
    victim = storage[1]
    victim_target = next(iter(victim.stores))
    await victim.stop()

    async def reconfigured():
      r = await _routing(server)
      return [t for t, p, _ in r["chains"][0]["targets"] if p == "serving"] and victim_target not in \
          [t for t, p, _ in r["chains"][0]["targets"] if p == "serving"]
    await _until(reconfigured)
    routing = await _routing(server)
    assert routing["chains"][0]["targets"][-1][0] == victim_target  # moved to the end
    await _write(routing, 1, CHUNK, 0, b"AFTER ")
    await _write(routing, 1, ChunkId(8, 0), 0, b"a chunk the victim never saw")
    assert set((await _read_all(routing, 1, CHUNK)).values()) == {b"AFTER  the crash"}

    storage[1] = returned = await StorageNode(tmp_path / "node1", server.address).start()
    async def serving_again():
      r = await _routing(server)
      return all(p == "serving" for _, p, _ in r["chains"][0]["targets"])
    await _until(serving_again)
    routing = await _routing(server)
    for node in storage:
      await node.refresh_routing()
    replicas = await _read_all(routing, 1, CHUNK)
    assert len(replicas) == 3 and set(replicas.values()) == {b"AFTER  the crash"}
    assert returned.stores[victim_target].read(ChunkId(8, 0)) == b"a chunk the victim never saw"
  _run(body, tmp_path)
