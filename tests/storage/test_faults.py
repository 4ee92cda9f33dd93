"""Faults with real processes on 127.0.0.1: kill -9 or freeze (SIGSTOP) each chain position mid-write, lose mgmtd, corrupt a chunk,
restart meta, and hostile requests. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest

import storage
from storage.__main__ import _spawn
from storage.transport import MAX_FRAME_BYTES, RpcClient, StorageError, new_event_loop

LEASE_S = 2.0


def _call(address, method, **args):
  async def go():
    client = RpcClient(address, timeout_s=10)
    try:
      return await client.call(method, **args)
    finally:
      await client.close()
  loop = new_event_loop()
  try:
    return loop.run_until_complete(go())
  finally:
    loop.close()


def _wait(predicate, timeout_s=30.0, what="condition"):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError(f"timed out waiting for {what}")
    time.sleep(0.1)


class Processes:
  def __init__(self, root):
    self.root, self.procs = root, {}

  def start(self, name, argv, kind):
    proc, address = _spawn(argv, kind)
    self.procs[name] = proc
    return address

  def kill(self, name, sig=signal.SIGKILL):
    proc = self.procs.pop(name)
    proc.send_signal(sig)
    proc.wait(timeout=10)

  def stop_all(self):
    for proc in self.procs.values():
      proc.send_signal(signal.SIGTERM)
    for proc in self.procs.values():
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def cluster(tmp_path):
  ps = Processes(tmp_path)
  try:
    mgmtd = ps.start("mgmtd", ["mgmtd", "--data-dir", str(tmp_path / "mgmtd"), "--lease-s", str(LEASE_S)], "mgmtd")
    nodes = [ps.start(f"node{i}", ["node", "--mgmtd", mgmtd, "--data-dir", str(tmp_path / f"node{i}")], "node")
             for i in range(3)]
    _call(mgmtd, "create_chain_table", replicas=3)
    meta = ps.start("meta", ["meta", "--mgmtd", mgmtd, "--kv", f"sqlite:{tmp_path / 'meta.db'}",
                             "--chunk-size", "65536"], "meta")
    yield ps, mgmtd, nodes, meta
  finally:
    ps.stop_all()


def _chain(mgmtd):
  return _call(mgmtd, "get_routing")["chains"][0]


@pytest.mark.parametrize("victim, fault", [("node0", "kill"), ("node1", "kill"), ("node2", "kill"),
                                           ("node0", "pause"), ("node2", "pause")])
def test_a_node_fails_while_writing_then_rejoins(cluster, tmp_path, victim, fault):
  """kill -9 the head, middle or tail of the chain mid-write (restarted later); or freeze the
  head or tail for longer than a lease and let it go on (a partition that heals, no restart)."""
  ps, mgmtd, nodes, meta = cluster
  acknowledged, stop, errors = {}, threading.Event(), []
  with storage.connect(mgmtd) as client:
    def writer():
      i = 0
      while not stop.is_set() and i < 400:
        payload = os.urandom(10_000 + i)
        try:
          with client.open(f"/w{i}", "wb") as f:
            f.write(payload)
          acknowledged[i] = payload
        except Exception as err:
          errors.append(err)
          return
        i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    _wait(lambda: len(acknowledged) >= 5, what="first writes")
    version = _chain(mgmtd)["version"]
    victim_target = _chain(mgmtd)["targets"][int(victim[-1])][0]
    if fault == "kill":
      ps.kill(victim)
    else:
      ps.procs[victim].send_signal(signal.SIGSTOP)
    _wait(lambda: len(acknowledged) >= 40 or errors, timeout_s=60, what="writes after the fault")
    chain = _chain(mgmtd)
    assert chain["version"] > version and chain["targets"][-1][0] == victim_target
    assert chain["targets"][-1][1] in ("offline", "lastsrv")
    if fault == "kill":
      stop.set()
      thread.join(timeout=60)
    for i, payload in list(acknowledged.items()):
      with client.open(f"/w{i}", "rb") as f:
        assert f.read() == payload
    if fault == "kill":
      ps.start(victim, ["node", "--mgmtd", mgmtd, "--data-dir", str(tmp_path / victim)], "node")
    else:  # the partition heals while the writer keeps writing: the frozen node finds its lease gone
      ps.procs[victim].send_signal(signal.SIGCONT)
    _wait(lambda: all(p == "serving" for _, p, _ in _chain(mgmtd)["targets"]), timeout_s=60, what="resync")
    stop.set()
    thread.join(timeout=60)
    assert not errors, errors
    for i in list(acknowledged)[-5:]:  # every replica answers, the returned one included
      for _ in range(3):
        assert client.pread(f"/w{i}", 0, 1 << 20) == acknowledged[i]


def test_a_node_cut_off_from_mgmtd_stops_serving(cluster):
  ps, mgmtd, nodes, meta = cluster
  chain = _chain(mgmtd)
  target = chain["targets"][0][0]
  routing = _call(mgmtd, "get_routing")
  address = next(n["address"] for n in routing["nodes"].values() if target in n["targets"])
  ps.kill("mgmtd")
  time.sleep(LEASE_S)  # more than half a lease
  with pytest.raises(StorageError, match="lost its mgmtd lease"):
    _call(address, "read", chain_id=1, chain_version=chain["version"], target=target, chunk=[1, 0])


def test_a_corrupted_chunk_is_served_from_another_replica(cluster, tmp_path):
  ps, mgmtd, nodes, meta = cluster
  payload = os.urandom(50_000)
  with storage.connect(mgmtd) as client:
    with client.open("/precious", "wb") as f:
      f.write(payload)
    victims = list((tmp_path / "node0").glob("target-*/data/*.v*"))
    assert victims
    good = {path: path.read_bytes() for path in victims}
    for path in victims:
      data = bytearray(path.read_bytes())
      data[100] ^= 0xFF
      path.write_bytes(bytes(data))
    for _ in range(6):  # reads rotate over replicas: node0's copy fails its checksum and is skipped
      assert client.pread("/precious", 0, len(payload)) == payload
    # ... and is repaired from another replica in the background
    _wait(lambda: all(path.exists() and path.read_bytes() == good[path] for path in victims), what="repair")


def test_meta_restart_loses_nothing(cluster, tmp_path):
  ps, mgmtd, nodes, meta = cluster
  with storage.connect(mgmtd) as client:
    client.mkdir("/kept/deep", parents=True)
    with client.open("/kept/deep/file", "wb") as f:
      f.write(b"committed")
  ps.kill("meta")
  live = ps.start("meta", ["meta", "--mgmtd", mgmtd, "--kv", f"sqlite:{tmp_path / 'meta.db'}", "--chunk-size",
                           "65536"], "meta")
  assert live in _call(mgmtd, "get_routing")["meta"]
  assert _call(live, "stat", path="/kept/deep/file")["size"] == len(b"committed")
  assert _call(live, "listdir", path="/kept") == ["deep"]


def _raw(address, payload: bytes) -> dict:
  async def go():
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return msgpack.unpackb(reply[4:], raw=False)
  loop = new_event_loop()
  try:
    return loop.run_until_complete(go())
  finally:
    loop.close()


def test_bad_input_gets_clear_errors_and_servers_keep_running(cluster):
  ps, mgmtd, nodes, meta = cluster
  for address in (nodes[0], meta, mgmtd):
    for payload in (struct.pack(">I", MAX_FRAME_BYTES + 1), struct.pack(">I", 4) + b"\xc1\xc1\xc1\xc1",
                    struct.pack(">I", 50) + b"short"):
      reply = _raw(address, payload)
      assert not reply["ok"] and reply["error"]["kind"] == "protocol"
  with pytest.raises(ValueError):
    _call(meta, "stat", path="/../../etc/passwd")
  with pytest.raises(FileNotFoundError):
    _call(meta, "stat", path="/no/such/file")
  chain = _chain(mgmtd)
  with pytest.raises(StorageError, match="stale"):
    _call(nodes[0], "read", chain_id=1, chain_version=chain["version"] - 1, target=chain["targets"][0][0],
          chunk=[1, 0])
  with pytest.raises(ValueError, match="unknown method"):
    _call(nodes[0], "format_disk")
  with storage.connect(mgmtd) as client:  # everyone still serves
    with client.open("/alive", "wb") as f:
      f.write(b"yes")
    assert client.pread("/alive", 0, 3) == b"yes"


def test_clients_fail_over_to_a_new_meta_server(cluster, tmp_path):
  ps, mgmtd, nodes, meta = cluster
  with storage.connect(mgmtd) as client:
    with client.open("/survives", "wb") as f:
      f.write(b"metadata lives in the shared KV store")
    ps.kill("meta")
    ps.start("meta2", ["meta", "--mgmtd", mgmtd, "--kv", f"sqlite:{tmp_path / 'meta.db'}", "--chunk-size", "65536"],
             "meta")
    assert client.stat("/survives").size == len(b"metadata lives in the shared KV store")  # same client, new server


_WRITER = """
import random, sys, storage
address, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with storage.connect(address) as client:
  for i in range(count):
    if name == "shared":  # rewrites one file again and again, each time with one repeated byte
      with client.open("/shared", "wb") as f:
        f.write(bytes([i % 251 + 1]) * 150_000)
    else:
      with client.open(f"/{name}-{i}", "wb") as f:
        f.write(random.Random(f"{name}-{i}").randbytes(20_000 + 997 * i))
print("done", flush=True)
"""


def test_concurrent_writer_processes_and_a_reader_of_a_file_being_rewritten(cluster):
  ps, mgmtd, nodes, meta = cluster
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  writers = [subprocess.Popen([sys.executable, "-c", _WRITER, mgmtd, name, count], stdout=subprocess.PIPE,
                              text=True, env=env)
             for name, count in (("a", "12"), ("b", "12"), ("c", "12"), ("shared", "25"))]
  reads = 0
  with storage.connect(mgmtd) as client:
    _wait(lambda: client.exists("/shared"), what="the shared file")
    while writers[-1].poll() is None:
      data = client.pread("/shared", 0, 1 << 20)  # the old bytes, nothing yet, or the new: never a mix
      assert len(set(data)) <= 1 and len(data) in (0, 150_000), (len(data), set(data))
      reads += 1
    for proc in writers:
      out, _ = proc.communicate(timeout=120)
      assert proc.returncode == 0 and out.strip() == "done"
    assert reads > 3
    for name in "abc":
      for i in range(12):
        with client.open(f"/{name}-{i}", "rb") as f:
          assert f.read() == random.Random(f"{name}-{i}").randbytes(20_000 + 997 * i)
    assert client.pread("/shared", 0, 1 << 20) == bytes([24 % 251 + 1]) * 150_000
