"""The cluster manager (3FS's mgmtd): membership, leases, chain tables and routing.

Storage nodes register their targets and heartbeat their local target states; each heartbeat
renews a lease. A scan (every quarter lease) marks the targets of nodes whose lease ran out as
locally offline and runs `update_chain` on every chain; any change bumps the routing version,
which is pushed to services and clients: each holds a `watch_routing` long poll open, answered
the moment the version moves (`storage.cluster.routing.RoutingWatcher`). Meta servers register
too, for discovery. Membership and chain
tables persist in a SQLite KV store in the data directory, so a restarted mgmtd keeps them.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

import msgpack

from storage.cluster.states import Chain, LocalState, PublicState, Target, update_chain
from storage.kv import SqliteKV, run_transaction

_STATE_KEY = b"CONFmgmtd-state"


class Mgmtd:
  """The manager's state and RPC handlers (serve them with `storage.transport.RpcServer(mgmtd.handlers)`)."""

  def __init__(self, data_dir, *, lease_s: float = 10.0, clock=time.monotonic):
    if lease_s <= 0:
      raise ValueError(f"lease_s must be positive, got {lease_s}")
    self.lease_s = lease_s
    self._clock = clock
    pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
    self._kv = SqliteKV(pathlib.Path(data_dir) / "mgmtd.db")
    saved = run_transaction(self._kv, lambda txn: txn.get(_STATE_KEY), read_only=True)
    state = msgpack.unpackb(saved, strict_map_key=False) if saved else {}
    self.nodes: dict[int, dict[str, Any]] = {int(k): v for k, v in state.get("nodes", {}).items()}
    self.chains: dict[int, Chain] = {int(k): _chain_from(v) for k, v in state.get("chains", {}).items()}
    self.routing_version: int = state.get("routing_version", 1)
    self.meta_servers: dict[str, float] = {}
    self._watchers: list[asyncio.Future] = []
    self._last_seen: dict[int, float] = {node: clock() for node in self.nodes}  # a restart grants a fresh lease

  def _bump(self) -> None:
    """A routing change: a new version, pushed at once to every open `watch_routing`."""
    self.routing_version += 1
    watchers, self._watchers = self._watchers, []
    for waiter in watchers:
      if not waiter.done():
        waiter.set_result(None)

  # -- persistence --
  def _save(self) -> None:
    state = {"nodes": self.nodes, "chains": {k: _chain_to(c) for k, c in self.chains.items()},
             "routing_version": self.routing_version}
    run_transaction(self._kv, lambda txn: txn.set(_STATE_KEY, msgpack.packb(state)))

  # -- RPC handlers --
  @property
  def handlers(self):
    return {"register_node": self.register_node, "heartbeat": self.heartbeat, "register_meta": self.register_meta,
            "get_routing": self.get_routing, "watch_routing": self.watch_routing,
            "create_chain_table": self.create_chain_table}

  async def register_node(self, address: str, num_targets: int, node_id: int | None = None) -> dict:
    """Adds a storage node (or re-registers a known one by `node_id`) and returns its target ids."""
    if not isinstance(address, str) or ":" not in address:
      raise ValueError(f"address must be HOST:PORT, got {address!r}")
    if not isinstance(num_targets, int) or not 1 <= num_targets <= 1024:
      raise ValueError(f"num_targets must be an int in [1, 1024], got {num_targets!r}")
    if node_id is not None and node_id in self.nodes:
      node = self.nodes[node_id]
      if len(node["targets"]) != num_targets:
        raise ValueError(f"node {node_id} registered {len(node['targets'])} targets before, not {num_targets}")
      node["address"] = address
    else:
      node_id = max(self.nodes, default=0) + 1
      self.nodes[node_id] = node = {"address": address, "targets": [node_id * 1000 + i for i in range(num_targets)]}
    self._last_seen[node_id] = self._clock()
    self._bump()
    self._save()
    return {"node_id": node_id, "targets": node["targets"], "lease_s": self.lease_s}

  async def heartbeat(self, node_id: int, local_states: dict) -> dict:
    """Renews `node_id`'s lease and records its targets' local states."""
    if node_id not in self.nodes:
      raise PermissionError(f"node {node_id} is not registered")
    states = {int(t): LocalState(s) for t, s in local_states.items()}
    unknown = set(states) - set(self.nodes[node_id]["targets"])
    if unknown:
      raise ValueError(f"node {node_id} does not own targets {sorted(unknown)}")
    self._last_seen[node_id] = self._clock()
    self._apply_local_states(states)
    return {"routing_version": self.routing_version, "lease_s": self.lease_s}

  async def register_meta(self, address: str) -> dict:
    self.meta_servers[address] = self._clock()
    return {"lease_s": self.lease_s}

  async def get_routing(self) -> dict:
    """Everything a service or client needs to route: nodes, chains with target states, meta servers."""
    now = self._clock()
    return {
        "version": self.routing_version,
        "nodes": {str(n): {"address": v["address"], "targets": v["targets"]} for n, v in self.nodes.items()},
        "chains": [_chain_to(c) for c in sorted(self.chains.values())],
        "meta": sorted(a for a, seen in self.meta_servers.items() if now - seen <= self.lease_s),
        "lease_s": self.lease_s,
    }

  async def watch_routing(self, known_version: int, wait_s: float = 5.0) -> dict:
    """Push by long poll: the routing as soon as its version differs from `known_version`, or
    after `wait_s` seconds (at most 60) with no change."""
    if not isinstance(known_version, int):
      raise ValueError(f"known_version must be an int, got {known_version!r}")
    if not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= 60:
      raise ValueError(f"wait_s must be in [0, 60] seconds, got {wait_s!r}")
    if known_version == self.routing_version:
      waiter = asyncio.get_running_loop().create_future()
      self._watchers.append(waiter)
      try:
        await asyncio.wait_for(waiter, wait_s)
      except asyncio.TimeoutError:
        pass
      finally:
        if waiter in self._watchers:
          self._watchers.remove(waiter)
    return await self.get_routing()

  async def create_chain_table(self, replicas: int) -> list[int]:
    """Builds the chain table once from the registered nodes: chains of `replicas` targets on
    different nodes, taking targets slot by slot across nodes (3FS's example layout)."""
    if self.chains:
      return sorted(self.chains)
    nodes = sorted(self.nodes)
    if not isinstance(replicas, int) or not 1 <= replicas <= len(nodes):
      raise ValueError(f"replicas must be in [1, {len(nodes)}] (the registered nodes), got {replicas!r}")
    slots = max(len(self.nodes[n]["targets"]) for n in nodes)
    ordered = [self.nodes[n]["targets"][s] for s in range(slots) for n in nodes if s < len(self.nodes[n]["targets"])]
    for chain_id, start in enumerate(range(0, len(ordered) - replicas + 1, replicas), start=1):
      members = ordered[start:start + replicas]
      self.chains[chain_id] = Chain(chain_id, 1, tuple(Target(t, PublicState.SERVING, LocalState.UP_TO_DATE)
                                                       for t in members))
    self._bump()
    self._save()
    return sorted(self.chains)

  # -- failure detection --
  def _apply_local_states(self, states: dict[int, LocalState]) -> None:
    changed = False
    for chain_id, chain in self.chains.items():
      updated = update_chain(chain, {t.target_id: states[t.target_id] for t in chain.targets if t.target_id in states})
      if updated != chain:
        changed |= updated.version != chain.version
        self.chains[chain_id] = updated
    if changed:
      self._bump()
      self._save()

  def scan(self) -> None:
    """Marks the targets of nodes past their lease offline and updates every chain."""
    now = self._clock()
    expired = {t: LocalState.OFFLINE for n, node in self.nodes.items()
               if now - self._last_seen.get(n, 0) > self.lease_s for t in node["targets"]}
    self._apply_local_states(expired)

  async def run_scanner(self) -> None:
    while True:
      await asyncio.sleep(self.lease_s / 4)
      self.scan()

  def close(self) -> None:
    self._kv.close()


def _chain_to(chain: Chain) -> dict:
  return {"chain_id": chain.chain_id, "version": chain.version,
          "targets": [[t.target_id, t.public.value, t.local.value] for t in chain.targets]}


def _chain_from(value: dict) -> Chain:
  return Chain(value["chain_id"], value["version"],
               tuple(Target(t, PublicState(p), LocalState(l)) for t, p, l in value["targets"]))
