"""The client against a whole cluster on loopback: files, namespace errors, concurrency, failover."""

from __future__ import annotations

import os
import threading
import time

import pytest

import storage
from storage.chunks import ChunkId
from tests.storage.local_cluster import LocalCluster


@pytest.fixture
def cluster(tmp_path):
  with LocalCluster(tmp_path) as c:
    yield c


def test_files_round_trip_across_chunks_and_chains(cluster):
  data = os.urandom(300_000)  # about 4.6 chunks of 64 KiB, striped over 4 chains
  with storage.connect(cluster.address) as client:
    client.mkdir("/data/run1", parents=True)
    with client.open("/data/run1/blob", "wb") as f:
      f.write(data[:1000])
      f.write(data[1000:])
    stat = client.stat("/data/run1/blob")
    assert stat.size == len(data) and len(set(stat.chains)) == 1  # one chain: 3 nodes x 1 target / 3
    with client.open("/data/run1/blob", "rb") as f:
      assert f.read(10) == data[:10]
      f.seek(65_530)
      assert f.read(20) == data[65_530:65_550]  # across a chunk boundary
      f.seek(0)
      assert f.read() == data
    assert client.pread("/data/run1/blob", 299_990, 100) == data[299_990:]
    assert client.listdir("/data") == ["run1"]
    client.rename("/data/run1/blob", "/data/blob")
    assert client.listdir("/data") == ["blob", "run1"]
    client.remove("/data/blob")
    assert not client.exists("/data/blob")


def test_namespace_errors_are_python_exceptions(cluster):
  with storage.connect(cluster.address) as client:
    with pytest.raises(FileNotFoundError):
      client.open("/missing", "rb")
    client.mkdir("/d")
    with pytest.raises(FileExistsError):
      client.mkdir("/d")
    with pytest.raises(IsADirectoryError):
      client.open("/d", "rb")
    with pytest.raises(NotADirectoryError):
      with client.open("/f", "wb") as f:
        f.write(b"x")
      client.listdir("/f")
    with pytest.raises(ValueError):
      client.stat("/a/../etc/passwd")
    with pytest.raises(ValueError, match="mode"):
      client.open("/f", "r+")


def test_concurrent_writers_and_a_reader(cluster):
  with storage.connect(cluster.address) as client:
    client.mkdir("/c")
    payloads = {i: os.urandom(100_000 + i) for i in range(4)}
    errors = []

    def writer(i):
      try:
        with client.open(f"/c/{i}", "wb") as f:
          f.write(payloads[i])
      except Exception as err:
        errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert not errors
    for i, payload in payloads.items():
      with client.open(f"/c/{i}", "rb") as f:
        assert f.read() == payload


def test_writes_continue_through_a_node_crash(cluster):
  with storage.connect(cluster.address) as client:
    with client.open("/before", "wb") as f:
      f.write(b"a" * 100_000)
    cluster.run(cluster.nodes[0].stop())  # the head of the only chain
    with client.open("/after", "wb") as f:
      f.write(b"b" * 100_000)  # retried until mgmtd reconfigures the chain
    with client.open("/before", "rb") as f:
      assert f.read() == b"a" * 100_000
    with client.open("/after", "rb") as f:
      assert f.read() == b"b" * 100_000


def test_ioring_batches_reads_into_one_buffer(cluster):
  import errno

  import numpy as np

  from storage.ioring import IoRing

  files = {f"/r/{i}": os.urandom(150_000 + i * 1000) for i in range(3)}
  with storage.connect(cluster.address) as client:
    client.mkdir("/r")
    for path, data in files.items():
      with client.open(path, "wb") as f:
        f.write(data)
    rng = np.random.default_rng(0)
    buffer = np.zeros(64 * 4096, np.uint8)
    ring = IoRing(client, buffer, entries=70)
    expected = {}
    for slot in range(64):
      path = f"/r/{slot % 3}"
      offset = int(rng.integers(0, len(files[path]) - 100))
      ring.prepare(path, offset, 4096, buffer_offset=slot * 4096, userdata=slot)
      expected[slot] = files[path][offset:offset + 4096]  # may be short at the end of a file
    ring.prepare("/r/missing", 0, 10, buffer_offset=0, userdata="missing")
    with pytest.raises(ValueError, match="does not fit"):
      ring.prepare("/r/0", 0, 10, buffer_offset=len(buffer))
    assert ring.submit() == 65
    done = {c.userdata: c.result for c in ring.wait(timeout=30)}
    assert done.pop("missing") == -errno.ENOENT
    for slot, want in expected.items():
      assert done[slot] == len(want)
      assert bytes(buffer[slot * 4096:slot * 4096 + len(want)]) == want


def test_rewriting_a_file_never_shows_its_old_bytes_through_holes(cluster):
  with storage.connect(cluster.address) as client:
    with client.open("/reused", "wb") as f:
      f.write(b"\xaa" * 200_000)
    with client.open("/reused", "wb") as f:
      f.write(b"new")
      f.seek(100_000)
      f.write(b"end")  # bytes 3..100_000 are a hole
    with client.open("/reused", "rb") as f:
      data = f.read()
    assert data == b"new" + bytes(100_000 - 3) + b"end"


def test_a_reader_during_a_write_sees_only_committed_bytes(cluster):
  """Readers of a file being rewritten see the old bytes, then nothing (the new inode's length is
  published at close, as 3FS's lengths are exact after close), then the new bytes: never a mix."""
  with storage.connect(cluster.address) as client:
    with client.open("/growing", "wb") as f:
      f.write(b"x" * 65_536)
    stop, seen, errors = threading.Event(), [], []

    def reader():
      while not stop.is_set():
        try:
          data = client.pread("/growing", 0, 1 << 20)
          seen.append(data)
          assert set(data) <= {ord("x"), ord("y")}, "a read saw bytes nobody wrote"
        except Exception as err:
          errors.append(err)
          return

    thread = threading.Thread(target=reader)
    thread.start()
    with client.open("/growing", "wb") as f:
      for _ in range(10):
        f.write(b"y" * 65_536)
        f.flush()
    stop.set()
    thread.join(timeout=30)
    assert not errors and len(seen) > 1
    for data in seen:
      assert data in (b"x" * 65_536, b"", b"y" * 655_360)
    assert client.pread("/growing", 0, 1 << 20) == b"y" * 655_360


def _chunks_everywhere(cluster, inode):
  """How many chunks of `inode` each storage target holds."""
  return [len(store.chunks_of(inode)) for node in cluster.nodes for store in node.stores.values()]


def _until(predicate, timeout_s=20.0):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def test_removed_and_replaced_files_are_reclaimed_on_every_replica(tmp_path):
  with LocalCluster(tmp_path, gc_delay_s=0.0) as cluster, storage.connect(cluster.address) as client:
    with client.open("/a", "wb") as f:
      f.write(os.urandom(200_000))  # 4 chunks
    inode = client.stat("/a").inode
    assert _chunks_everywhere(cluster, inode) == [4, 4, 4]
    reader = client.open("/a", "rb")
    client.remove("/a")
    _until(lambda: _chunks_everywhere(cluster, inode) == [0, 0, 0])
    with pytest.raises(FileNotFoundError, match="removed"):  # a late reader is told, never given zeros
      reader.read()
    for replace in (lambda: client.rename("/b2", "/b"), lambda: client.open("/b", "wb").close()):
      with client.open("/b", "wb") as f:
        f.write(b"x" * 70_000)
      with client.open("/b2", "wb") as f:
        f.write(b"y")
      old = client.stat("/b").inode
      replace()
      _until(lambda: _chunks_everywhere(cluster, old) == [0, 0, 0])
    # /a, and three generations of /b (each "wb" retires the last). The count rises just after the
    # chunks are gone (the GC queue entry is dropped last), so wait for it rather than race it.
    _until(lambda: cluster.meta.reclaimed >= 4, timeout_s=10)
    time.sleep(0.3)  # several more collector rounds: nothing is reclaimed twice
    assert cluster.meta.reclaimed == 4


def test_a_file_removed_while_written_is_reclaimed_when_its_writer_closes(tmp_path):
  with LocalCluster(tmp_path, gc_delay_s=0.0) as cluster, storage.connect(cluster.address) as client:
    f = client.open("/w", "wb")
    f.write(b"z" * 100_000)
    f.flush()
    inode = client.stat("/w").inode
    client.remove("/w")
    time.sleep(0.5)  # several collector rounds
    assert _chunks_everywhere(cluster, inode) == [2, 2, 2]  # an open writer holds them
    f.close()  # closing a removed file is not an error
    _until(lambda: _chunks_everywhere(cluster, inode) == [0, 0, 0])


def test_truncate_cuts_the_chunks_so_growing_again_reads_zeros(cluster):
  with storage.connect(cluster.address) as client:
    with client.open("/t", "wb") as f:
      f.write(b"\xaa" * 200_000)  # chunks 0..3 of 64 KiB
    stat = client.truncate("/t", 100_000)
    assert stat.size == 100_000
    lengths = [store.length(ChunkId(stat.inode, 1)) for node in cluster.nodes for store in node.stores.values()]
    assert lengths == [100_000 - 65_536] * 3  # the boundary chunk cut on every replica
    assert _chunks_everywhere(cluster, stat.inode) == [2, 2, 2]
    assert client.truncate("/t", 200_000).size == 200_000
    assert client.pread("/t", 0, 200_000) == b"\xaa" * 100_000 + bytes(100_000)
    with pytest.raises(ValueError, match="length"):
      client.truncate("/t", -1)
    client.mkdir("/d")
    with pytest.raises(IsADirectoryError):
      client.truncate("/d", 0)


def test_truncating_a_file_being_written_keeps_the_writers_bytes(cluster):
  with storage.connect(cluster.address) as client:
    f = client.open("/open", "wb")
    f.write(b"A" * 200_000)
    f.flush()  # acknowledged, though the length is published only at close
    assert client.stat("/open").size == 0
    client.truncate("/open", 1_000_000)  # growing: nothing of the writer's may go
    f.close()
    assert client.pread("/open", 0, 200_000) == b"A" * 200_000
    assert client.stat("/open").size == 1_000_000


def test_write_at_writes_ranges_in_place_and_refuses_growth(cluster):
  with storage.connect(cluster.address) as client:
    stat = client.create("/table", truncate=False)
    stat = client.truncate("/table", 200_000)            # preallocated: zeros
    client.write_at([(stat, 10, b"abc"), (stat, 131_070, b"across")])  # the second crosses a chunk boundary
    assert client.pread("/table", 8, 7) == b"\0\0abc\0\0"
    assert client.pread("/table", 131_070, 6) == b"across"
    assert client.stat("/table").size == 200_000
    with pytest.raises(ValueError, match="within the file's 200000 bytes"):
      client.write_at([(stat, 199_999, b"xy")])
    assert client.create("/table", truncate=False).size == 200_000  # opening again keeps the bytes
    with pytest.raises(FileExistsError):
      client.create("/table", exclusive=True)
