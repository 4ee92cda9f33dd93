"""The meta service: the namespace's operations as RPCs, one stateless server among any number.

It learns the chain table from mgmtd's routing push (files are striped over its chains) and
registers itself there for discovery. The KV store is shared by all meta servers (SQLite on one host, etcd
across hosts), so a restarted or replaced server loses nothing committed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from storage.cluster.routing import RoutingWatcher
from storage.kv import KVEngine
from storage.meta.namespace import Namespace, Stat
from storage.transport import RpcClient, RpcServer


def stat_dict(stat: Stat) -> dict[str, Any]:
  return {"inode": stat.inode, "is_dir": stat.is_dir, "size": stat.size, "mode": stat.mode, "mtime": stat.mtime,
          "nlink": stat.nlink,
          "layout": None if stat.layout is None else {"chunk_size": stat.layout.chunk_size,
                                                      "chains": list(stat.layout.chains)}}


class MetaServer:
  """Serves `Namespace` operations over the transport; `await server.start()`."""

  def __init__(self, engine: KVEngine, mgmtd_address: str, *, host: str = "127.0.0.1", port: int = 0,
               chunk_size: int = 1 << 20, stripe: int = 16):
    self.engine = engine
    self.mgmtd = RpcClient(mgmtd_address, timeout_s=5.0)
    self.watcher = RoutingWatcher(mgmtd_address, on_change=self._adopt)
    self.chunk_size, self.stripe = chunk_size, stripe
    self.namespace: Namespace | None = None
    self.server = RpcServer(self._handlers(), host, port)
    self._task: asyncio.Task | None = None

  @property
  def address(self) -> str:
    return self.server.address

  async def start(self) -> "MetaServer":
    await self.server.start()
    await self._refresh()
    self.watcher.start()
    self._task = asyncio.create_task(self._heartbeat())
    return self

  async def stop(self) -> None:
    if self._task:
      self._task.cancel()
      await asyncio.gather(self._task, return_exceptions=True)
    await self.watcher.close()
    await self.server.stop()
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
      return stat_dict(await call("truncate", path, length))

    async def open_session(inode: int):
      return await call("open_session", inode)

    async def close_session(inode: int, session: str, length: int | None = None):
      return stat_dict(await call("close_session", inode, session, length))

    return {"stat": stat, "create": create, "mkdir": mkdir, "listdir": listdir, "rename": rename,
            "unlink": unlink, "rmdir": rmdir, "truncate": truncate, "open_session": open_session,
            "close_session": close_session}
