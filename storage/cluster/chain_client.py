"""Calling storage targets by chain, as clients and meta servers do, through reconfigurations.

A chain's updates go to the head of its write path (serving targets, then syncing ones); reads
go to any serving replica, in turn. A stale chain version, a replica that stopped serving, a
write in flight ("pending"), a corrupted replica or a lost connection refreshes the routing and
retries, a bounded number of times; any other error is the answer. A request still waiting when
mgmtd pushes a new version of its chain is abandoned and re-routed, so a frozen or partitioned
replica (which accepts connections but never answers) costs a lease, not a whole timeout.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Awaitable, Callable

from storage.cluster.routing import RoutingWatcher
from storage.transport import RpcClient, StorageError

RETRY_KINDS = frozenset({"stale_chain", "not_serving", "pending", "corrupted", "unavailable"})


class ChainClient:
  """Routes calls to chains using `watcher`'s routing.

  Args:
    watcher: the routing (refreshed on retryable failures).
    timeout_s: per-call timeout towards storage nodes.
    attempts: tries before giving up with StorageError(kind="unavailable").
    backoff_s: the first retry's pause; it grows linearly to ten times that.
  """

  def __init__(self, watcher: RoutingWatcher, *, timeout_s: float = 30.0, attempts: int = 200,
               backoff_s: float = 0.02):
    self.watcher, self.timeout_s, self.attempts, self.backoff_s = watcher, timeout_s, attempts, backoff_s
    self._nodes: dict[str, RpcClient] = {}
    self._turn = itertools.count()

  def chain(self, chain_id: int) -> dict:
    for chain in self.watcher.routing["chains"]:
      if chain["chain_id"] == chain_id:
        return chain
    raise StorageError(f"chain {chain_id} is not in routing version {self.watcher.routing['version']}",
                       "stale_chain")

  def node(self, target: int) -> RpcClient:
    address = next((n["address"] for n in self.watcher.routing["nodes"].values() if target in n["targets"]), None)
    if address is None:
      raise StorageError(f"no node hosts target {target}", "stale_chain")
    if address not in self._nodes:
      self._nodes[address] = RpcClient(address, timeout_s=self.timeout_s)
    return self._nodes[address]

  async def retrying(self, attempt: Callable[[], Awaitable[Any]]) -> Any:
    last: Exception | None = None
    for n in range(self.attempts):
      try:
        return await attempt()
      except StorageError as err:
        if err.kind not in RETRY_KINDS:
          raise
        last = err
      except (ConnectionError, TimeoutError) as err:
        last = err
      await asyncio.sleep(self.backoff_s * min(n + 1, 10))
      try:
        await self.watcher.refresh()
      except (ConnectionError, OSError, TimeoutError) as err:  # mgmtd briefly away: keep trying
        last = err
    raise StorageError(f"gave up after {self.attempts} attempts: {last}", "unavailable")

  async def _call(self, chain: dict, target: int, method: str, **args) -> Any:
    """One request to `target`, abandoned (as a retryable "stale_chain") if the chain moves first."""
    request = asyncio.ensure_future(self.node(target).call(method, chain_id=chain["chain_id"],
                                                           chain_version=chain["version"], target=target, **args))
    moved = asyncio.ensure_future(self.watcher.until_chain_moves(chain["chain_id"], chain["version"]))
    try:
      await asyncio.wait({request, moved}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      moved.cancel()
      abandoned = not request.done()
      if abandoned:
        request.cancel()
    if abandoned:
      raise StorageError(f"chain {chain['chain_id']} moved past version {chain['version']} while target {target} "
                         f"had not answered", "stale_chain")
    return request.result()

  async def call_head(self, chain_id: int, method: str, **args) -> Any:
    """`method` at the head of the chain's write path (writes, trims)."""
    async def attempt():
      chain = self.chain(chain_id)
      path = [t for t, public, _ in chain["targets"] if public in ("serving", "syncing")]
      if not path:
        raise StorageError(f"chain {chain_id} has no serving target", "not_serving")
      return await self._call(chain, path[0], method, **args)
    return await self.retrying(attempt)

  async def call_replica(self, chain_id: int, method: str, **args) -> Any:
    """`method` at a serving replica, spreading calls; a retry moves on to the next replica."""
    async def attempt():
      chain = self.chain(chain_id)
      replicas = [t for t, public, _ in chain["targets"] if public == "serving"]
      if not replicas:
        raise StorageError(f"chain {chain_id} has no serving replica", "not_serving")
      target = replicas[next(self._turn) % len(replicas)]
      return await self._call(chain, target, method, **args)
    return await self.retrying(attempt)

  async def close(self) -> None:
    for client in self._nodes.values():
      await client.close()
    self._nodes.clear()
