"""The storage service: a node's targets, CRAQ replication along chains, and resync of returning replicas.

Writes enter at the head of a chain's write path (its serving targets, then its syncing ones),
which serializes them per chunk with a lock, stores a pending version and forwards the whole
updated chunk to its successor; the tail commits at once and acknowledges, and every node
commits on the acknowledgement (3FS design notes, "Data replication"). Reads go to any serving
target and answer "pending" while a write to the chunk is in flight. Every request names the
chain version it was routed with; a mismatch is refused with the latest version, so the caller
re-routes. A node whose lease lapsed (no mgmtd for half a lease) refuses everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
from typing import Any

from storage.chunks import ChunkCorrupted, ChunkId, ChunkNotFound, ChunkStore, PendingWrite
from storage.cluster.lease import LeaseKeeper
from storage.cluster.resync import ChunkMeta, plan_sync
from storage.cluster.routing import RoutingWatcher
from storage.cluster.states import LocalState
from storage.transport import RpcClient, RpcServer, StorageError, is_remote

MAX_CHUNK_BYTES = 64 << 20


class StaleChain(StorageError):
  def __init__(self, message: str):
    super().__init__(message, "stale_chain")


class NotServing(StorageError):
  def __init__(self, message: str):
    super().__init__(message, "not_serving")


class StorageNode:
  """One storage node: `await node.start()` registers with mgmtd and serves on `node.address`."""

  def __init__(self, data_dir, mgmtd_address: str, *, num_targets: int = 1, host: str = "127.0.0.1",
               port: int = 0):
    self.data_dir = pathlib.Path(data_dir)
    self.data_dir.mkdir(parents=True, exist_ok=True)
    self.mgmtd = RpcClient(mgmtd_address, timeout_s=5.0)
    self.num_targets = num_targets
    self.server = RpcServer(self._handlers(), host, port)
    self.stores: dict[int, ChunkStore] = {}
    self.local: dict[int, LocalState] = {}
    self.watcher = RoutingWatcher(mgmtd_address, on_change=self._on_routing)
    self._locks: dict[tuple[int, str], asyncio.Lock] = {}
    self._peers: dict[str, RpcClient] = {}
    self._syncing: set[int] = set()
    self.repairs = 0  # corrupted chunks replaced from another replica
    self._updates: set[asyncio.Task] = set()  # chain updates in flight (see `_unstoppable`)
    self._stopping = False
    self._tasks: set[asyncio.Task] = set()  # background work: heartbeats, resyncs, repairs
    self.lease: LeaseKeeper | None = None

  # -- lifecycle --
  @property
  def address(self) -> str:
    return self.server.address

  async def start(self) -> "StorageNode":
    await self.server.start()
    identity = self.data_dir / "node.json"
    known = json.loads(identity.read_text())["node_id"] if identity.exists() else None
    reply = await self.mgmtd.call("register_node", address=self.address, num_targets=self.num_targets, node_id=known)
    identity.write_text(json.dumps({"node_id": reply["node_id"]}))
    self.node_id = reply["node_id"]
    for target in reply["targets"]:
      self.stores[target] = ChunkStore(self.data_dir / f"target-{target}", MAX_CHUNK_BYTES)
      # A restarted node's data may be stale: it comes back "online" and is resynced before serving.
      self.local[target] = LocalState.ONLINE if known is not None else LocalState.UP_TO_DATE
    self.lease = LeaseKeeper(self.mgmtd, self.node_id, lambda: {t: s.value for t, s in self.local.items()},
                             reply["lease_s"])
    await self.refresh_routing()
    if known is not None:
      await self._wait_until_marked_offline()
    await self.lease.beat()
    self.watcher.start()
    self._spawn(self._background())
    return self

  @property
  def routing(self) -> dict[str, Any]:
    return self.watcher.routing

  async def _wait_until_marked_offline(self) -> None:
    """3FS: a restarted node stays silent until mgmtd has marked all its targets down, so none
    can go back to serving without a resync (online + serving would stay serving)."""
    while True:
      states = {t: public for chain in self.routing["chains"] for t, public, _ in chain["targets"] if t in self.stores}
      if all(public in ("offline", "lastsrv") for public in states.values()):
        return
      await asyncio.sleep(self.lease.lease_s / 8)
      await self.refresh_routing()

  def _spawn(self, coro) -> None:
    task = asyncio.create_task(coro)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  async def stop(self) -> None:
    self._stopping = True  # a routing push starts no more resyncs
    for task in list(self._tasks):
      task.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    await asyncio.wait_for(self.server.stop(), 10)
    if self._updates:  # let in-flight updates commit or abort; a stuck one is cut off
      await asyncio.wait(set(self._updates), timeout=5)
      for task in self._updates:
        task.cancel()
      await asyncio.gather(*self._updates, return_exceptions=True)
    await asyncio.wait_for(self.watcher.close(), 5)  # after the drain: updates may still re-route
    for client in [self.mgmtd, *self._peers.values()]:
      await asyncio.wait_for(client.close(), 5)
    for store in self.stores.values():
      store.close()

  def _rejoin_marked_down_targets(self) -> None:
    """A target mgmtd marked down (we were cut off, or slow) may have missed writes: report it
    "online" so it goes through resync instead of waiting forever as "up-to-date"."""
    for chain in self.routing["chains"]:
      for target, public, _ in chain["targets"]:
        if target in self.local and public in ("offline", "waiting") and self.local[target] is LocalState.UP_TO_DATE:
          self.local[target] = LocalState.ONLINE

  async def _on_routing(self, routing: dict) -> None:
    """Pushed routing: act on a new chain state at once rather than at the next heartbeat."""
    del routing
    if self._stopping:
      return
    self._rejoin_marked_down_targets()
    await self._start_resyncs()

  async def _background(self) -> None:
    while True:
      await self.lease.beat()
      if self.lease.routing_version != self.routing["version"]:  # in case a push was missed
        await self.refresh_routing()
      await self._on_routing(self.routing)
      await asyncio.sleep(self.lease.lease_s / 8)

  async def refresh_routing(self) -> None:
    try:
      await self.watcher.refresh()
    except (OSError, TimeoutError, ConnectionError):
      pass

  # -- routing helpers --
  def _chain(self, chain_id: int) -> dict:
    for chain in self.routing["chains"]:
      if chain["chain_id"] == chain_id:
        return chain
    raise StaleChain(f"chain {chain_id} is unknown to this node (routing version {self.routing['version']})")

  async def _check(self, chain_id: int, chain_version: int, target: int) -> dict:
    if self.lease is None or not self.lease.serving:
      raise NotServing(f"node {getattr(self, 'node_id', '?')} has lost its mgmtd lease and is not serving")
    if target not in self.stores:
      raise ValueError(f"target {target} is not on this node")
    try:
      chain = self._chain(chain_id)
    except StaleChain:  # a chain we have not heard of yet: catch up first
      await self.refresh_routing()
      chain = self._chain(chain_id)
    if chain_version > chain["version"]:  # the caller has newer routing than we do: catch up first
      await self.refresh_routing()
      chain = self._chain(chain_id)
    if chain["version"] != chain_version:
      raise StaleChain(f"chain {chain_id} version {chain_version} is stale; latest is {chain['version']}")
    return chain

  @staticmethod
  def write_path(chain: dict) -> list[int]:
    return [t for t, public, _ in chain["targets"] if public in ("serving", "syncing")]

  def _node_of(self, target: int) -> str:
    for node in self.routing["nodes"].values():
      if target in node["targets"]:
        return node["address"]
    raise StaleChain(f"no node hosts target {target}")

  def _peer(self, address: str) -> RpcClient:
    if address not in self._peers:
      self._peers[address] = RpcClient(address, timeout_s=5.0)
    return self._peers[address]

  def _lock(self, target: int, chunk: ChunkId) -> asyncio.Lock:
    return self._locks.setdefault((target, chunk.name), asyncio.Lock())

  # -- RPC handlers --
  def _handlers(self):
    return {"write": self.write, "replicate": self.replicate, "read": self.read, "trim": self.trim,
            "fetch_chunk": self.fetch_chunk, "dump_chunkmeta": self.dump_chunkmeta,
            "sync_replace": self.sync_replace, "sync_remove": self.sync_remove, "sync_done": self.sync_done}

  async def write(self, chain_id: int, chain_version: int, target: int, chunk: list, offset: int,
                  data: bytes) -> dict:
    """A client write, at the head: returns the committed chunk version."""
    chain = await self._check(chain_id, chain_version, target)
    path = self.write_path(chain)
    if not path or path[0] != target:
      raise StaleChain(f"target {target} is not the head of chain {chain_id}")
    chunk_id = ChunkId(*chunk)
    store = self.stores[target]
    if store.is_removed(chunk_id.inode):
      raise FileNotFoundError(f"inode {chunk_id.inode} was removed; its chunks are reclaimed")

    async def locked():
      async with self._lock(target, chunk_id):
        if store.is_removed(chunk_id.inode):  # again, under the lock: a trim may have just passed
          raise FileNotFoundError(f"inode {chunk_id.inode} was removed; its chunks are reclaimed")
        try:
          version = store.prepare(chunk_id, offset, data, chain_version)
        except ChunkCorrupted:  # the head needs the old bytes for a partial write: fetch a good copy
          await self._repair(chain_id, target, chunk_id)
          version = store.prepare(chunk_id, offset, data, chain_version)
        return await self._pass_on_and_commit(chain_id, chain_version, target, chunk_id, version)
    return await self._unstoppable(locked())

  async def replicate(self, chain_id: int, chain_version: int, target: int, chunk: list, data: bytes,
                      version: int) -> dict:
    """A forwarded write: the whole chunk at `version`; stored pending, forwarded on, committed on the ack."""
    chain = await self._check(chain_id, chain_version, target)
    chunk_id = ChunkId(*chunk)
    store = self.stores[target]
    del chain

    async def locked():
      async with self._lock(target, chunk_id):
        store.abort(chunk_id)  # a pending left by an earlier, failed attempt
        meta = store.meta(chunk_id)
        if meta is not None and version <= meta.committed:
          # A resend of a write this replica already committed (its ack was lost), or a retry of
          # a write the head gave up on: the head is the authority, so take its bytes as they are.
          store.replace(chunk_id, data, version, chain_version)
          await self._forward_until_acked(chain_id, target, chunk_id, version)
          return {"version": version}
        store.replace_pending(chunk_id, data, version, chain_version)
        return await self._pass_on_and_commit(chain_id, chain_version, target, chunk_id, version)
    return await self._unstoppable(locked())

  async def _unstoppable(self, coro) -> Any:
    """Runs a chain update to its end even if the caller hangs up: once forwarded, a write must
    commit (or abort on a real failure); cancelling it half-way would leave replicas unequal.
    `stop()` waits for these (bounded)."""
    task = asyncio.ensure_future(coro)
    self._updates.add(task)
    task.add_done_callback(self._updates.discard)
    return await asyncio.shield(task)

  async def _pass_on_and_commit(self, chain_id: int, chain_version: int, target: int, chunk: ChunkId,
                                version: int) -> dict:
    """CRAQ's steps 5-6 for a pending `version` held under the chunk lock: forward it down the
    chain, commit on the acknowledgement, or drop it if the chain could not take it."""
    try:
      await self._forward_until_acked(chain_id, target, chunk, version)
    except Exception:
      self.stores[target].abort(chunk)
      raise
    self.stores[target].commit(chunk, version, chain_version)
    return {"version": version}

  async def _forward_until_acked(self, chain_id: int, target: int, chunk: ChunkId, version: int) -> None:
    """Forwards the pending chunk version to the successor (see `_send_down_chain`)."""
    data = self.stores[target].read(chunk, relaxed=True)
    await self._send_down_chain(chain_id, target, "replicate", chunk=list(chunk), data=data, version=version)

  async def _send_down_chain(self, chain_id: int, target: int, method: str, **args) -> None:
    """Calls `method` on the current successor of `target` (nothing at the tail); if it fails or
    the chain changed, waits for new routing and resends to whoever the successor is then
    (3FS: "A keeps forwarding the request to C")."""
    deadline = asyncio.get_running_loop().time() + 3 * self.lease.lease_s
    while True:
      chain = self._chain(chain_id)
      path = self.write_path(chain)
      if target not in path:
        raise NotServing(f"target {target} left the write path of chain {chain_id}")
      if path.index(target) + 1 == len(path):
        return  # the tail: commit at once
      successor = path[path.index(target) + 1]
      try:
        await self._peer(self._node_of(successor)).call(method, chain_id=chain_id, chain_version=chain["version"],
                                                        target=successor, **args)
        return
      except (ConnectionError, OSError, TimeoutError, StorageError) as err:
        if isinstance(err, StorageError):
          retryable = err.kind in ("stale_chain", "not_serving")
        else:  # the successor unreachable or slow; not its answer (a full disk, a missing chunk)
          retryable = isinstance(err, (ConnectionError, TimeoutError)) or not is_remote(err)
        if not retryable or asyncio.get_running_loop().time() > deadline:
          raise
      await asyncio.sleep(0.05)
      await self.refresh_routing()

  async def trim(self, chain_id: int, chain_version: int, target: int, inode: int, length: int, chunk_size: int,
                 remove: bool = False, chunks: list | None = None) -> dict:
    """Cuts a file's chunks on this chain to its first `length` bytes (a file of `chunk_size`
    chunks), on every replica. A caller sends it to the head (`chunks` None), which cuts the
    boundary chunk as a CRAQ write and names the chunks past `length` it holds; each replica
    drops exactly those and passes the request on. Every chunk involved stays locked on a replica
    until the replicas after it are done, so a write to the file is ordered wholly before or
    after the trim on every replica. `remove` (length 0) also leaves a tombstone, so late
    readers of a removed file get FileNotFoundError. Returns how many chunks were dropped here.
    """
    for name, value in (("inode", inode), ("length", length), ("chunk_size", chunk_size)):
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if chunk_size == 0 or chunk_size > MAX_CHUNK_BYTES:
      raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_BYTES}], got {chunk_size}")
    if remove and length:
      raise ValueError(f"remove=True reclaims a whole file: length must be 0, got {length}")
    if chunks is not None and not (isinstance(chunks, list) and all(isinstance(c, int) and c >= 0 for c in chunks)):
      raise ValueError("chunks must be a list of non-negative chunk indexes")
    chain = await self._check(chain_id, chain_version, target)
    path = self.write_path(chain)
    if target not in path:
      raise NotServing(f"target {target} is not in the write path of chain {chain_id}")
    if chunks is None and path[0] != target:
      raise StaleChain(f"target {target} is not the head of chain {chain_id}")
    store = self.stores[target]
    boundary, keep = divmod(length, chunk_size)
    first_gone = boundary + (1 if keep else 0)

    async def run():
      if remove:  # from here on the head refuses writes to the file (checked under each chunk lock,
        store.mark_removed(inode)  # with no await between that check and the chunk's creation)
      with contextlib.ExitStack() as unlock:
        cut = ChunkId(inode, boundary) if keep and chunks is None else None
        if cut is not None:
          await self._hold(unlock, target, cut)
        # The head lists what lies past the cut; the successors drop exactly that list, so a chunk
        # written meanwhile is never dropped on some replicas only.
        names = [c.index for c in store.chunks_of(inode) if c.index >= first_gone] if chunks is None else \
            sorted(set(chunks))
        for index in names:
          await self._hold(unlock, target, ChunkId(inode, index))
        if cut is not None and store.length(cut) > keep:
          version = store.prepare(cut, 0, b"", chain_version, cut=keep)
          await self._pass_on_and_commit(chain_id, chain_version, target, cut, version)
        await self._send_down_chain(chain_id, target, "trim", inode=inode, length=length, chunk_size=chunk_size,
                                    remove=remove, chunks=names)
        for index in names:  # only once every replica after this one is done: a failed trim is retried
          store.remove(ChunkId(inode, index))  # from the head, which still lists these chunks
      return {"dropped": len(names)}
    return await self._unstoppable(run())

  async def _hold(self, stack: contextlib.ExitStack, target: int, chunk: ChunkId) -> None:
    """Takes a chunk's lock until `stack` closes."""
    lock = self._lock(target, chunk)
    await lock.acquire()
    stack.callback(lock.release)

  async def read(self, chain_id: int, chain_version: int, target: int, chunk: list, offset: int = 0,
                 length: int | None = None) -> dict:
    """Committed bytes of a chunk; "pending" while a write is in flight; "corrupted" on a bad checksum."""
    chain = await self._check(chain_id, chain_version, target)
    if not any(t == target and public == "serving" for t, public, _ in chain["targets"]):
      raise NotServing(f"target {target} is not serving reads in chain {chain_id}")
    chunk_id = ChunkId(*chunk)
    try:
      data = self.stores[target].read(chunk_id, offset, length)
    except ChunkNotFound:
      if self.stores[target].is_removed(chunk_id.inode):
        raise FileNotFoundError(f"inode {chunk_id.inode} was removed; its chunks are reclaimed") from None
      data = b""  # never written: a hole
    except PendingWrite as err:
      raise StorageError(str(err), "pending") from None
    except ChunkCorrupted as err:
      self._spawn(self._repair_locked(chain_id, target, chunk_id))
      raise StorageError(str(err), "corrupted") from None
    return {"data": data}

  # -- repair of a corrupted replica --
  async def fetch_chunk(self, chain_id: int, chain_version: int, target: int, chunk: list) -> dict:
    """The committed chunk and its versions, for a replica repairing a corrupted copy."""
    await self._check(chain_id, chain_version, target)
    chunk_id = ChunkId(*chunk)
    store = self.stores[target]
    meta = store.meta(chunk_id)
    if meta is None:
      raise FileNotFoundError(f"chunk {chunk_id.name} is not on target {target}")
    try:
      data = store.read(chunk_id)
    except PendingWrite as err:
      raise StorageError(str(err), "pending") from None
    except ChunkCorrupted as err:
      raise StorageError(str(err), "corrupted") from None
    return {"data": data, "version": meta.committed, "chain_version": meta.chain_version}

  async def _repair_locked(self, chain_id: int, target: int, chunk: ChunkId) -> None:
    try:
      async with self._lock(target, chunk):
        try:
          self.stores[target].read(chunk)
          return  # repaired (or rewritten) meanwhile
        except ChunkCorrupted:
          pass
        except (ChunkNotFound, PendingWrite):
          return
        await self._repair(chain_id, target, chunk)
    except Exception as err:  # the next read or write tries again
      logging.warning("repair of chunk %s on target %s failed: %s", chunk.name, target, err)

  async def _repair(self, chain_id: int, target: int, chunk: ChunkId) -> None:
    """Replaces this replica's corrupted committed chunk with a good copy from another replica
    of the chain (caller holds the chunk lock). Raises ChunkCorrupted if no replica has one."""
    chain = self._chain(chain_id)
    mine = self.stores[target].meta(chunk)
    for other, public, _ in chain["targets"]:
      if other == target or public != "serving":  # a syncing replica may hold stale bytes
        continue
      try:
        reply = await self._peer(self._node_of(other)).call("fetch_chunk", chain_id=chain_id,
                                                           chain_version=chain["version"], target=other,
                                                           chunk=list(chunk))
      except (ConnectionError, OSError, TimeoutError, StorageError):
        continue
      if mine is not None and (reply["chain_version"], reply["version"]) < (mine.chain_version, mine.committed):
        continue  # an older copy than the one we lost: not a repair
      self.stores[target].replace(chunk, reply["data"], reply["version"], reply["chain_version"])
      self.repairs += 1
      logging.warning("chunk %s on target %s failed its checksum; repaired from target %s", chunk.name, target, other)
      return
    raise ChunkCorrupted(f"chunk {chunk.name} is corrupted on target {target} and no other replica has a good copy")

  # -- resync (this node as the returning replica) --
  async def _check_syncing(self, chain_id: int, chain_version: int, target: int) -> None:
    """Resync writes are accepted only for a target its chain lists as syncing, at the sender's version."""
    chain = await self._check(chain_id, chain_version, target)
    if not any(t == target and public == "syncing" for t, public, _ in chain["targets"]):
      raise NotServing(f"target {target} is not syncing in chain {chain_id} (version {chain['version']})")

  async def dump_chunkmeta(self, chain_id: int, chain_version: int, target: int) -> dict:
    await self._check_syncing(chain_id, chain_version, target)
    return {name: list(meta) for name, meta in self.stores[target].dump_meta().items()}

  async def sync_replace(self, chain_id: int, chain_version: int, target: int, chunk: list, data: bytes,
                         version: int, chunk_chain_version: int) -> None:
    await self._check_syncing(chain_id, chain_version, target)
    chunk_id = ChunkId(*chunk)
    async with self._lock(target, chunk_id):
      mine = self.stores[target].meta(chunk_id)
      if mine is not None and (mine.chain_version, mine.committed) > (chunk_chain_version, version):
        return  # a newer write already reached this replica: never roll it back
      self.stores[target].replace(chunk_id, data, version, chunk_chain_version)

  async def sync_remove(self, chain_id: int, chain_version: int, target: int, chunks: list) -> None:
    await self._check_syncing(chain_id, chain_version, target)
    for chunk in chunks:
      chunk_id = ChunkId(*chunk)
      async with self._lock(target, chunk_id):
        self.stores[target].remove(chunk_id)

  async def sync_done(self, chain_id: int, chain_version: int, target: int, removed_inodes: list = ()) -> None:
    """The end of a resync; `removed_inodes` are the predecessor's tombstones (see `trim`)."""
    await self._check_syncing(chain_id, chain_version, target)
    self.stores[target].mark_removed(*(int(inode) for inode in removed_inodes))
    self.local[target] = LocalState.UP_TO_DATE
    await self.lease.beat()

  # -- resync (this node as the predecessor) --
  async def _start_resyncs(self) -> None:
    for chain in self.routing["chains"]:
      targets = chain["targets"]
      for (mine, public, _), (succ, succ_public, _) in zip(targets, targets[1:]):
        if mine in self.stores and public == "serving" and succ_public == "syncing" and succ not in self._syncing:
          self._syncing.add(succ)
          self._spawn(self._resync(chain["chain_id"], mine, succ))

  def _still_syncing(self, chain_id: int, mine: int, successor: int) -> dict:
    """The chain, if this node may still sync `successor` from `mine`; else raises (the resync stops)."""
    if not self.lease.serving:
      raise NotServing(f"node {self.node_id} lost its lease: resync of target {successor} stops")
    chain = self._chain(chain_id)
    states = {t: public for t, public, _ in chain["targets"]}
    if states.get(mine) != "serving" or states.get(successor) != "syncing":
      raise NotServing(f"chain {chain_id} changed (version {chain['version']}): resync of target {successor} stops")
    return chain

  async def _resync(self, chain_id: int, mine: int, successor: int) -> None:
    """Full-chunk transfers to a returning replica (3FS "Data recovery"): every call carries the
    chain version, and the walk stops as soon as this node loses its lease or the chain moves on
    (a later routing push starts it again, if still needed)."""
    peer = self._peer(self._node_of(successor))
    store = self.stores[mine]

    async def call(method, **args):
      chain = self._still_syncing(chain_id, mine, successor)
      return await peer.call(method, chain_id=chain_id, chain_version=chain["version"], target=successor, **args)

    try:
      remote = {name: ChunkMeta(*meta) for name, meta in (await call("dump_chunkmeta")).items()}
      plan = plan_sync(store.dump_meta(), remote)
      for name in sorted(plan.transfer):
        chunk = _chunk_of(name)
        async with self._lock(mine, chunk):
          meta = store.meta(chunk)
          if meta is None:
            continue  # removed meanwhile: the removal reached the successor through the chain
          data = store.read(chunk)
          await call("sync_replace", chunk=list(chunk), data=data, version=meta.committed,
                     chunk_chain_version=meta.chain_version)
      for name in sorted(plan.remove):
        chunk = _chunk_of(name)
        async with self._lock(mine, chunk):  # re-check: a write since the dump created it here too
          if store.meta(chunk) is None:
            await call("sync_remove", chunks=[list(chunk)])
      await call("sync_done", removed_inodes=store.removed_inodes())
    except Exception:  # retried on a later routing push
      logging.exception("resync of target %s from %s stopped", successor, mine)
    finally:
      self._syncing.discard(successor)


def _chunk_of(name: str) -> ChunkId:
  """A chunk's id from its `ChunkId.name`."""
  return ChunkId(int(name[:16], 16), int(name[17:], 16))
