"""mgmtd: registration, chain tables, lease expiry, recovery states, persistence, and its RPC surface."""

from __future__ import annotations

import asyncio

import pytest

from storage import transport
from storage.cluster.mgmtd import Mgmtd
from storage.cluster.states import PublicState


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _run(coro):
  loop = transport.new_event_loop()
  try:
    return loop.run_until_complete(asyncio.wait_for(coro, 30))
  finally:
    loop.close()


async def _cluster(mgmtd, nodes=3, targets=2):
  ids = []
  for n in range(nodes):
    ids.append(await mgmtd.register_node(f"127.0.0.1:{9000 + n}", targets))
  await mgmtd.create_chain_table(3)
  return ids


def test_chain_table_uses_distinct_nodes(tmp_path):
  async def body():
    mgmtd = Mgmtd(tmp_path, lease_s=10)
    await _cluster(mgmtd, nodes=4, targets=3)
    routing = await mgmtd.get_routing()
    assert len(routing["chains"]) == 4  # 12 targets / 3 replicas
    for chain in routing["chains"]:
      owners = {t // 1000 for t, _, _ in chain["targets"]}
      assert len(owners) == 3 and all(state == "serving" for _, state, _ in chain["targets"])
    assert await mgmtd.create_chain_table(3) == [1, 2, 3, 4]  # built once
    mgmtd.close()
  _run(body())


def test_lease_expiry_reconfigures_and_recovery_returns_to_serving(tmp_path):
  async def body():
    clock = Clock()
    mgmtd = Mgmtd(tmp_path, lease_s=10, clock=clock)
    nodes = await _cluster(mgmtd)
    version = mgmtd.routing_version
    clock.now = 6
    for node in nodes[:2]:  # node 3 stays silent
      await mgmtd.heartbeat(node["node_id"], {t: "up-to-date" for t in node["targets"]})
    clock.now = 11
    mgmtd.scan()
    assert mgmtd.routing_version == version + 1
    chain = mgmtd.chains[1]
    assert chain.targets[-1].target_id // 1000 == 3 and chain.targets[-1].public is PublicState.OFFLINE
    assert chain.version == 2 and len(chain.serving) == 2
    # node 3 comes back: online -> waiting -> syncing (its predecessor serves) -> up-to-date -> serving
    back = nodes[2]
    for local, want in (("online", PublicState.WAITING), ("online", PublicState.SYNCING),
                        ("up-to-date", PublicState.SERVING)):
      await mgmtd.heartbeat(back["node_id"], {t: local for t in back["targets"]})
      assert mgmtd.chains[1].targets[-1].public is want
    mgmtd.close()
  _run(body())


def test_state_survives_a_restart(tmp_path):
  async def body():
    first = Mgmtd(tmp_path, lease_s=10)
    nodes = await _cluster(first)
    routing = await first.get_routing()
    first.close()
    again = Mgmtd(tmp_path, lease_s=10)
    assert (await again.get_routing())["chains"] == routing["chains"]
    assert (await again.register_node("127.0.0.1:9100", 2, node_id=nodes[0]["node_id"]))["targets"] == nodes[0]["targets"]
    again.close()
  _run(body())


def test_rpc_surface_and_bad_requests(tmp_path):
  async def body():
    mgmtd = Mgmtd(tmp_path, lease_s=10)
    server = await transport.RpcServer(mgmtd.handlers).start()
    client = transport.RpcClient(server.address)
    node = await client.call("register_node", address="127.0.0.1:9000", num_targets=1)
    await client.call("register_meta", address="127.0.0.1:9500")
    routing = await client.call("get_routing")
    assert routing["nodes"][str(node["node_id"])]["address"] == "127.0.0.1:9000" and routing["meta"] == ["127.0.0.1:9500"]
    with pytest.raises(PermissionError, match="not registered"):
      await client.call("heartbeat", node_id=99, local_states={})
    with pytest.raises(ValueError, match="does not own"):
      await client.call("heartbeat", node_id=node["node_id"], local_states={"5": "online"})
    with pytest.raises(ValueError, match="num_targets"):
      await client.call("register_node", address="127.0.0.1:1", num_targets=0)
    with pytest.raises(ValueError, match="replicas"):
      await client.call("create_chain_table", replicas=3)
    with pytest.raises(ValueError, match="unexpected keyword argument 'bogus'"):
      await client.call("register_node", bogus=1)
    await client.close()
    await server.stop()
    mgmtd.close()
  _run(body())


def test_a_service_cut_off_from_mgmtd_stops_serving(tmp_path):
  from storage.cluster.lease import LeaseKeeper

  async def body():
    mgmtd = Mgmtd(tmp_path, lease_s=0.4)
    server = await transport.RpcServer(mgmtd.handlers).start()
    # A generous RPC timeout (a stopped server refuses at once) and a fake clock for the lease:
    # a slow fsync on a loaded machine must not decide the test.
    client = transport.RpcClient(server.address, timeout_s=10)
    node = await client.call("register_node", address="127.0.0.1:9000", num_targets=1)
    clock = Clock()
    keeper = LeaseKeeper(client, node["node_id"], lambda: {node["targets"][0]: "up-to-date"}, lease_s=0.4,
                         clock=clock)
    assert not keeper.serving and await keeper.beat() and keeper.serving
    await server.stop()  # mgmtd unreachable from here on
    assert not await keeper.beat()
    clock.now += 0.19
    assert keeper.serving  # within half the lease of the last reply
    clock.now += 0.02  # more than half the lease
    assert not keeper.serving
    await client.close()
    mgmtd.close()
  _run(body())


def test_watch_routing_answers_at_once_on_a_change_and_waits_otherwise(tmp_path):
  async def body():
    mgmtd = Mgmtd(tmp_path, lease_s=10)
    version = mgmtd.routing_version
    loop = asyncio.get_running_loop()
    started = loop.time()
    unchanged = await mgmtd.watch_routing(version, wait_s=0.2)
    assert unchanged["version"] == version and loop.time() - started >= 0.15  # timers may fire a tick early
    assert (await mgmtd.watch_routing(version - 1, wait_s=5))["version"] == version  # already behind: no wait
    watch = asyncio.ensure_future(mgmtd.watch_routing(version, wait_s=30))
    await asyncio.sleep(0.05)
    assert not watch.done()
    await mgmtd.register_node("127.0.0.1:9000", 1)
    pushed = await asyncio.wait_for(watch, 1)
    assert pushed["version"] == version + 1 and "1" in pushed["nodes"]
    with pytest.raises(ValueError, match="wait_s"):
      await mgmtd.watch_routing(version, wait_s=600)
    mgmtd.close()
  _run(body())


def test_a_routing_watcher_receives_pushes_over_the_wire(tmp_path):
  from storage.cluster.routing import RoutingWatcher

  async def body():
    mgmtd = Mgmtd(tmp_path, lease_s=10)
    server = await transport.RpcServer(mgmtd.handlers).start()
    changes = []

    async def on_change(routing):
      changes.append(routing["version"])
    watcher = RoutingWatcher(server.address, on_change=on_change, wait_s=30)  # far longer than the test
    await watcher.refresh()
    watcher.start()
    await asyncio.sleep(0.05)
    await mgmtd.register_node("127.0.0.1:9000", 1)
    for _ in range(100):
      if changes:
        break
      await asyncio.sleep(0.01)
    assert changes == [mgmtd.routing_version] and watcher.pushes == 1
    assert watcher.routing["nodes"]["1"]["address"] == "127.0.0.1:9000"
    await watcher.close()
    await server.stop()
    mgmtd.close()
  _run(body())


def test_a_routing_watcher_never_goes_back_to_older_routing():
  from storage.cluster.routing import RoutingWatcher

  async def body():
    watcher = RoutingWatcher("127.0.0.1:1")
    assert watcher._store({"version": 5, "nodes": {}, "chains": [], "meta": []})
    assert not watcher._store({"version": 4, "nodes": {"1": {}}, "chains": [], "meta": []})  # a slow reply
    assert watcher.routing["version"] == 5 and watcher.routing["nodes"] == {}
    await watcher.close()
  _run(body())
