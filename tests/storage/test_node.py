"""CRAQ on real loopback sockets: three storage nodes and mgmtd in one event loop.

Writes go to the head and are committed along the chain; reads from any serving replica agree;
a stale chain version is refused; a crashed node is reconfigured out, writes go on, and when it
returns it is resynced before it serves again. (A node cut off from mgmtd is tested with real
processes in test_faults.py.)
"""

from __future__ import annotations

import asyncio
import os
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
    await _write(routing, 1, ChunkId(12, 0), 0, b"a file removed while the victim was away")
    head = StorageNode.write_path(routing["chains"][0])[0]
    client = RpcClient(_owner(storage, head).address)
    assert (await client.call("trim", chain_id=1, chain_version=routing["chains"][0]["version"], target=head,
                              inode=12, length=0, chunk_size=1 << 20, remove=True))["dropped"] == 1
    await client.close()

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
    assert returned.stores[victim_target].is_removed(12)  # the tombstone travelled with the resync
    with pytest.raises(FileNotFoundError, match="removed"):
      await _read_all(routing, 1, ChunkId(12, 0))
  _run(body, tmp_path)


def _owner(storage, target):
  return next(n for n in storage if target in n.stores)


def _corrupt(node, target, chunk):
  store = node.stores[target]
  path = store._path(chunk, store.meta(chunk).committed)
  path.write_bytes(b"\x00" + path.read_bytes()[1:])


def test_a_corrupted_chunk_on_the_head_is_repaired_before_a_partial_write(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    await _write(routing, 1, CHUNK, 0, b"hello chain")
    head = StorageNode.write_path(routing["chains"][0])[0]
    _corrupt(_owner(storage, head), head, CHUNK)
    assert (await _write(routing, 1, CHUNK, 6, b"CRAQ!"))["version"] == 2  # needs the old bytes
    assert set((await _read_all(routing, 1, CHUNK)).values()) == {b"hello CRAQ!"}
    assert _owner(storage, head).repairs == 1
  _run(body, tmp_path)


def test_a_corrupted_replica_found_by_a_read_is_repaired_in_the_background(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    await _write(routing, 1, CHUNK, 0, b"precious bytes")
    tail = routing["chains"][0]["targets"][-1][0]
    _corrupt(_owner(storage, tail), tail, CHUNK)
    with pytest.raises(StorageError, match="checksum") as err:
      await _read_all(routing, 1, CHUNK)
    assert err.value.kind == "corrupted"

    async def repaired():
      try:
        return set((await _read_all(routing, 1, CHUNK)).values()) == {b"precious bytes"}
      except StorageError:
        return False
    await _until(repaired)
    assert _owner(storage, tail).repairs == 1
  _run(body, tmp_path)


def test_resync_requests_are_refused_unless_the_target_is_syncing(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    chain = routing["chains"][0]
    target = chain["targets"][-1][0]
    node = _owner(storage, target)
    client = RpcClient(node.address)
    try:
      with pytest.raises(StorageError, match="not syncing") as err:  # a serving replica is never overwritten
        await client.call("sync_replace", chain_id=1, chain_version=chain["version"], target=target,
                          chunk=list(CHUNK), data=b"evil", version=99, chunk_chain_version=99)
      assert err.value.kind == "not_serving"
      with pytest.raises(StorageError, match="stale"):
        await client.call("sync_done", chain_id=1, chain_version=chain["version"] - 1, target=target)
    finally:
      await client.close()
    assert node.stores[target].meta(CHUNK) is None
  _run(body, tmp_path)


def test_writes_during_a_resync_reach_every_replica(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    victim = storage[2]
    victim_target = next(iter(victim.stores))
    await victim.stop()

    async def reconfigured():
      r = await _routing(server)
      return victim_target not in [t for t, p, _ in r["chains"][0]["targets"] if p == "serving"]
    await _until(reconfigured)
    routing = await _routing(server)
    for i in range(60):  # enough chunks that the resync takes a while
      await _write(routing, 1, ChunkId(9, i), 0, bytes([i]) * 4096)
    expected = {i: bytes([i]) * 4096 for i in range(60)}
    states_seen = []

    stop, errors = asyncio.Event(), []

    async def writer():  # keeps writing while the victim returns and resyncs
      r, n = routing, 0
      while not stop.is_set():
        n += 1
        i = n % 60
        try:
          await _write(r, 1, ChunkId(9, i), 0, b"w%05d" % n)
          expected[i] = b"w%05d" % n + expected[i][6:]
        except StorageError as err:  # the chain moved: re-route (a refused write changed nothing)
          errors.append(err)
          await asyncio.sleep(0.02)
        r = await _routing(server)
        states_seen.append(tuple(p for _, p, _ in r["chains"][0]["targets"]))

    task = asyncio.create_task(writer())
    storage[2] = await StorageNode(tmp_path / "node2", server.address).start()

    async def serving_again():
      r = await _routing(server)
      return all(p == "serving" for _, p, _ in r["chains"][0]["targets"])
    await _until(serving_again, timeout_s=30)
    await asyncio.sleep(0.2)
    stop.set()
    await task
    assert all(err.kind == "stale_chain" for err in errors), errors
    assert sum("syncing" in states for states in states_seen) >= 3, "no writes overlapped the resync"
    routing = await _routing(server)
    for node in storage:
      await node.refresh_routing()
    for i, data in expected.items():
      replicas = await _read_all(routing, 1, ChunkId(9, i))
      assert len(replicas) == 3 and set(replicas.values()) == {data}, i
  _run(body, tmp_path)


def test_a_client_hanging_up_mid_write_leaves_the_replicas_equal(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    chain = routing["chains"][0]
    head = StorageNode.write_path(chain)[0]
    for i in range(10):
      client = RpcClient(_owner(storage, head).address)
      call = asyncio.ensure_future(client.call("write", chain_id=1, chain_version=chain["version"], target=head,
                                               chunk=[11, i], offset=0, data=os.urandom(30_000)))
      await asyncio.sleep(0.001 * i)  # hang up at different points of the write
      await client.close()
      await asyncio.gather(call, return_exceptions=True)

    async def settled():
      try:
        replicas = [await _read_all(routing, 1, ChunkId(11, i)) for i in range(10)]
      except StorageError:  # "pending" while a write finishes
        return False
      return all(len(r) == 3 and len(set(r.values())) == 1 for r in replicas)
    await _until(settled)
  _run(body, tmp_path)


def test_trim_cuts_every_replica_and_only_the_head_takes_it_from_callers(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    chain = routing["chains"][0]
    for i in range(4):
      await _write(routing, 1, ChunkId(13, i), 0, bytes([i + 1]) * 1000)
    path = StorageNode.write_path(chain)
    tail = RpcClient(_owner(storage, path[-1]).address)
    with pytest.raises(StorageError, match="not the head"):
      await tail.call("trim", chain_id=1, chain_version=chain["version"], target=path[-1], inode=13, length=0,
                      chunk_size=1000)
    await tail.close()
    head = RpcClient(_owner(storage, path[0]).address)
    reply = await head.call("trim", chain_id=1, chain_version=chain["version"], target=path[0], inode=13,
                            length=1500, chunk_size=1000)  # keeps chunk 0 and half of chunk 1
    await head.close()
    assert reply == {"dropped": 2}
    for node in storage:
      store = next(iter(node.stores.values()))
      assert [c.index for c in store.chunks_of(13)] == [0, 1] and store.read(ChunkId(13, 1)) == b"\x02" * 500
  _run(body, tmp_path)


def test_a_trim_that_fails_downstream_is_finished_by_a_retry(tmp_path):
  async def body(mgmtd, server, scanner, storage):
    routing = await _routing(server)
    chain = routing["chains"][0]
    for i in range(3):
      await _write(routing, 1, ChunkId(14, i), 0, b"x" * 100)
    path = StorageNode.write_path(chain)
    tail = _owner(storage, path[-1])
    real_trim, failures = tail.trim, []

    async def failing_once(**args):
      if not failures:
        failures.append(args)
        raise ValueError("a tail that refuses once")
      return await real_trim(**args)
    tail.server.handlers["trim"] = failing_once
    head = RpcClient(_owner(storage, path[0]).address)
    args = dict(chain_id=1, chain_version=chain["version"], target=path[0], inode=14, length=0, chunk_size=100,
                remove=True)
    with pytest.raises(ValueError, match="refuses once"):
      await head.call("trim", **args)
    assert (await head.call("trim", **args))["dropped"] == 3  # the head still lists what it holds
    await head.close()
    assert [len(next(iter(n.stores.values())).chunks_of(14)) for n in storage] == [0, 0, 0]
  _run(body, tmp_path)
