"""The meta service: the namespace's operations as RPCs, one stateless server among any number.

It learns the chain table from mgmtd's routing push (files are striped over its chains) and
registers itself there for discovery. The KV store is shared by all meta servers (SQLite on one host, etcd
across hosts), so a restarted or replaced server loses nothing committed.

Meta is off the data path except where the namespace changes what storage must hold: a
truncation first cuts the file's chunks on every chain (so bytes past the new length can never
reappear when the file grows again), and a background collector reclaims the chunks of removed
files once their writers have closed and a grace period for open readers has passed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from storage.cluster.chain_client import ChainClient
from storage.cluster.routing import RoutingWatcher
from storage.kv import KVEngine
from storage.meta.namespace import Namespace, Stat
from storage.transport import RpcClient, RpcServer, StorageError


def stat_dict(stat: Stat) -> dict[str, Any]:
  return {"inode": stat.inode, "is_dir": stat.is_dir, "size": stat.size, "mode": stat.mode, "mtime": stat.mtime,
          "nlink": stat.nlink,
          "layout": None if stat.layout is None else {"chunk_size": stat.layout.chunk_size,
                                                      "chains": list(stat.layout.chains)}}


class MetaServer:
  """Serves `Namespace` operations over the transport; `await server.start()`.

  Args:
    engine: the KV store shared by all meta servers.
    mgmtd_address: HOST:PORT of mgmtd.
    chunk_size, stripe: the layout of new files.
    gc_delay_s: how long a removed file's chunks stay readable (for readers that opened it
      before); after that, readers get FileNotFoundError.
    gc_interval_s: how often the collector looks for removed files.
    session_ttl_s: a writer session older than this no longer holds back reclaiming its
      removed file (its writer died without closing).
  """

  def __init__(self, engine: KVEngine, mgmtd_address: str, *, host: str = "127.0.0.1", port: int = 0,
               chunk_size: int = 1 << 20, stripe: int = 16, gc_delay_s: float = 30.0, gc_interval_s: float = 1.0,
               session_ttl_s: float = 86400.0):
    if gc_delay_s < 0 or gc_interval_s <= 0:
      raise ValueError(f"gc_delay_s must be >= 0 and gc_interval_s > 0, got {gc_delay_s} and {gc_interval_s}")
    self.engine = engine
    self.mgmtd = RpcClient(mgmtd_address, timeout_s=5.0)
    self.watcher = RoutingWatcher(mgmtd_address, on_change=self._adopt)
    self.chains = ChainClient(self.watcher, timeout_s=10.0, attempts=50)  # a few seconds through a failover
    self.chunk_size, self.stripe = chunk_size, stripe
    self.gc_delay_s, self.gc_interval_s, self.session_ttl_s = gc_delay_s, gc_interval_s, session_ttl_s
    self.namespace: Namespace | None = None
    self.server = RpcServer(self._handlers(), host, port)
    self._tasks: list[asyncio.Task] = []
    self.reclaimed = 0  # files whose chunks this server reclaimed

  @property
  def address(self) -> str:
    return self.server.address

  async def start(self) -> "MetaServer":
    await self.server.start()
    await self._refresh()
    self.watcher.start()
    self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._collect_garbage())]
    return self

  async def stop(self) -> None:
    await self.server.stop()  # first: no request may reopen what closes below
    for task in self._tasks:
      task.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    await self.chains.close()
    await self.watcher.close()
    await self.mgmtd.close()

  async def _refresh(self) -> None:
    reply = await self.mgmtd.call("register_meta", address=self.address)
    self._lease_s = reply["lease_s"]
    await self._adopt(await self.watcher.refresh())

  async def _adopt(self, routing: dict) -> None:
    """New files stripe over the chain table in `routing`."""
    chains = [c["chain_id"] for c in routing["chains"]]
    if chains and (self.namespace is None or tuple(chains) != self.namespace.chains):
      self.namespace = await asyncio.to_thread(Namespace, self.engine, chains, chunk_size=self.chunk_size,
                                               stripe=self.stripe)

  async def _heartbeat(self) -> None:
    while True:
      await asyncio.sleep(self._lease_s / 4)
      try:
        await self._refresh()
      except (OSError, TimeoutError, ConnectionError):
        pass

  async def trim(self, inode: int, layout, length: int, *, remove: bool = False) -> None:
    """Cuts a file's chunks to `length` bytes on every chain of its stripe, in parallel."""
    await asyncio.gather(*(self.chains.call_head(chain, "trim", inode=inode, length=length,
                                                 chunk_size=layout.chunk_size, remove=remove)
                           for chain in layout.chains))

  def _has_head(self, chain_id: int) -> bool:
    try:
      chain = self.chains.chain(chain_id)
    except StorageError:
      return False
    return any(public in ("serving", "syncing") for _, public, _ in chain["targets"])

  async def collect_garbage_once(self) -> int:
    """Reclaims the chunks of removed files that are ready; returns how many files."""
    if self.namespace is None:
      return 0
    failed, done = set(), 0
    while True:  # a file whose chains are down is skipped this round, not retried in a loop
      ready = await asyncio.to_thread(self.namespace.garbage, older_than_s=self.gc_delay_s,
                                      session_ttl_s=self.session_ttl_s, skip=frozenset(failed))
      if not ready:
        return done
      for inode, layout in ready:
        try:
          if not all(self._has_head(chain) for chain in layout.chains):
            raise StorageError(f"a chain of inode {inode} has no serving target", "not_serving")
          await self.trim(inode, layout, 0, remove=True)
        except Exception as err:  # anything: this file waits for the next round, the others go on
          logging.warning("reclaiming inode %d failed (%s); next round", inode, err)
          failed.add(inode)
          continue
        await asyncio.to_thread(self.namespace.forget_garbage, inode)
        self.reclaimed += 1
        done += 1

  async def _collect_garbage(self) -> None:
    while True:
      await asyncio.sleep(self.gc_interval_s)
      try:
        await self.collect_garbage_once()
      except Exception:  # chains down, KV busy: the queue keeps the work for the next round
        logging.exception("reclaiming removed files failed; will retry")

  def _ns(self) -> Namespace:
    if self.namespace is None:
      raise RuntimeError("the cluster has no chain table yet (create it through mgmtd)")
    return self.namespace

  def _handlers(self):
    async def call(method, *args, **kwargs):
      return await asyncio.to_thread(getattr(self._ns(), method), *args, **kwargs)

    async def stat(path: str):
      return stat_dict(await call("stat", path))

    async def create(path: str, exclusive: bool = False, truncate: bool = True):
      return stat_dict(await call("create", path, exclusive=exclusive, truncate=truncate))

    async def mkdir(path: str, parents: bool = False, exist_ok: bool = False):
      return stat_dict(await call("mkdir", path, parents=parents, exist_ok=exist_ok))

    async def listdir(path: str):
      return await call("listdir", path)

    async def rename(src: str, dst: str):
      await call("rename", src, dst)

    async def unlink(path: str):
      return stat_dict(await call("unlink", path))

    async def rmdir(path: str):
      await call("rmdir", path)

    async def truncate(path: str, length: int):
      if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
      before = await call("stat", path)
      if before.is_dir:
        raise IsADirectoryError(f"is a directory: {path}")
      # Storage first: once the length is committed, bytes past it must already be gone. With no
      # writer open, bytes past the recorded size are a dead writer's and go too (growing must
      # read zeros); an open writer's bytes past it are its own, so then only a shrink cuts.
      writing = await call("sessions", before.inode, younger_than_s=self.session_ttl_s)
      bound = length if writing else min(before.size, length)
      if not writing or length < before.size:
        await self.trim(before.inode, before.layout, bound)
      # The length goes on the inode that was trimmed, wherever a rename has moved it since.
      return stat_dict(await call("truncate_inode", before.inode, length, path=path))

    async def open_session(inode: int):
      return await call("open_session", inode)

    async def close_session(inode: int, session: str, length: int | None = None):
      return stat_dict(await call("close_session", inode, session, length))

    return {"stat": stat, "create": create, "mkdir": mkdir, "listdir": listdir, "rename": rename,
            "unlink": unlink, "rmdir": rmdir, "truncate": truncate, "open_session": open_session,
            "close_session": close_session}
