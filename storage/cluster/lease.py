"""A service's side of the mgmtd lease: heartbeat, and stop serving when cut off for half a lease.

3FS: mgmtd declares a service dead after T seconds without heartbeats, and a service that cannot
reach mgmtd for T/2 stops serving, so by the time mgmtd reconfigures a chain the cut-off node has
already stopped answering; two heads can never both accept writes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from storage.transport import RpcClient


class LeaseKeeper:
  """Heartbeats `node_id`'s local target states to mgmtd; `serving` turns False after lease/2 without a reply."""

  def __init__(self, mgmtd: RpcClient, node_id: int, local_states: Callable[[], dict], lease_s: float, *,
               clock=time.monotonic):
    self.mgmtd, self.node_id, self.local_states, self.lease_s = mgmtd, node_id, local_states, lease_s
    self._clock = clock
    self.last_ok: float | None = None
    self.routing_version: int | None = None

  @property
  def serving(self) -> bool:
    return self.last_ok is not None and self._clock() - self.last_ok <= self.lease_s / 2

  async def beat(self) -> bool:
    """One heartbeat; True if mgmtd answered."""
    sent = self._clock()  # the lease runs from when mgmtd could have seen us, not when it replied
    try:
      reply = await self.mgmtd.call("heartbeat", node_id=self.node_id,
                                    local_states={str(t): s for t, s in self.local_states().items()})
    except (OSError, TimeoutError, ConnectionError):
      return False
    self.last_ok = sent
    self.routing_version = reply["routing_version"]
    return True

  async def run(self) -> None:
    """Heartbeats every lease/8 until cancelled."""
    while True:
      await self.beat()
      await asyncio.sleep(self.lease_s / 8)
