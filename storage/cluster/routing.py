"""A service's or client's copy of the routing, kept current by mgmtd's push.

`RoutingWatcher` holds one `watch_routing` long poll open on its own connection (so heartbeats
and other calls never queue behind it); mgmtd answers it the moment the routing version moves,
and the watcher stores the new routing and calls `on_change`. A lost mgmtd is retried with a
short backoff; callers that need fresher routing than the push (a peer named a newer chain
version) still call `refresh()`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from storage.transport import RpcClient

_EMPTY: dict[str, Any] = {"version": 0, "nodes": {}, "chains": [], "meta": []}


class RoutingWatcher:
  """Routing from mgmtd at `address`: `routing` is the latest; `start()` begins the push.

  Args:
    address: mgmtd's HOST:PORT.
    on_change: awaited after each new routing arrives (errors are logged, not raised).
    wait_s: how long one long poll stays open without a change.
  """

  def __init__(self, address: str, *, on_change: Callable[[dict], Awaitable[None]] | None = None,
               wait_s: float = 5.0):
    self.routing: dict[str, Any] = dict(_EMPTY)
    self._on_change = on_change
    self._wait_s = wait_s
    self._poll = RpcClient(address, timeout_s=wait_s + 5.0)
    self._calls = RpcClient(address, timeout_s=5.0)
    self._task: asyncio.Task | None = None
    self._changed = asyncio.Event()
    self.pushes = 0  # routings received through the long poll (for tests and monitoring)

  async def refresh(self) -> dict:
    """Fetches the routing now (raises ConnectionError/TimeoutError when mgmtd is away)."""
    self._store(await self._calls.call("get_routing"))
    return self.routing

  def _store(self, routing: dict) -> bool:
    if routing["version"] < self.routing["version"]:
      return False  # a slow reply overtaken by a push: never go back to older routing
    newer = routing["version"] != self.routing["version"] or routing != self.routing
    self.routing = routing
    if newer:
      self._changed.set()
      self._changed = asyncio.Event()
    return newer

  async def until_chain_moves(self, chain_id: int, version: int) -> None:
    """Returns once the routing shows `chain_id` at a version other than `version` (or gone):
    callers race a request against it, to give up on a replica the chain has left."""
    while True:
      chain = next((c for c in self.routing["chains"] if c["chain_id"] == chain_id), None)
      if chain is None or chain["version"] != version:
        return
      await self._changed.wait()

  def start(self) -> "RoutingWatcher":
    if self._task is None:
      self._task = asyncio.create_task(self._watch())
    return self

  async def _watch(self) -> None:
    while True:
      try:
        routing = await self._poll.call("watch_routing", known_version=self.routing["version"], wait_s=self._wait_s)
      except (ConnectionError, OSError, TimeoutError):
        await asyncio.sleep(0.2)
        continue
      except Exception:  # an error reply (say, an mgmtd bug): keep the push alive, but say so
        logging.exception("watch_routing failed; retrying")
        await asyncio.sleep(1.0)
        continue
      if routing["version"] < self.routing["version"]:  # mgmtd lost state and restarted behind us
        logging.warning("mgmtd answered routing version %s, older than our %s; waiting", routing["version"],
                        self.routing["version"])
        await asyncio.sleep(1.0)
        continue
      if routing["version"] != self.routing["version"]:
        self.pushes += 1
      if self._store(routing) and self._on_change is not None:
        try:
          await self._on_change(routing)
        except Exception:  # a callback bug must not stop the push
          logging.exception("routing change handler failed")

  async def close(self) -> None:
    if self._task is not None:
      self._task.cancel()
      await asyncio.gather(self._task, return_exceptions=True)
      self._task = None
    await self._poll.close()
    await self._calls.close()
