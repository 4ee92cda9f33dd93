"""`SharedReader`: one unbuffered handle read by several threads with seek-then-read pairs (DuckDB's use)."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

import storage
from storage.client import SharedReader
from tests.storage.local_cluster import LocalCluster

_SIZE = 400_000  # about 6 chunks of 64 KiB


@pytest.fixture(scope="module")
def reader_and_data(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster, storage.connect(cluster.address) as client:
    data = os.urandom(_SIZE)
    with client.open("/blob", "wb") as f:
      f.write(data)
    with client.open("/blob", "rb", buffering=0) as reader:
      assert isinstance(reader, SharedReader)
      yield reader, data


def _in_thread(fn):
  out = []
  thread = threading.Thread(target=lambda: out.append(fn()))
  thread.start()
  thread.join()
  return out[0]


def test_a_threads_read_starts_at_its_own_seek(reader_and_data):
  reader, data = reader_and_data
  reader.seek(1000)                               # this thread
  assert _in_thread(lambda: (reader.seek(70_000), reader.read(10))[1]) == data[70_000:70_010]
  assert reader.tell() == 1000
  assert reader.read(10) == data[1000:1010]       # not 70_010, where the other thread left off


def test_sequential_reads_handed_between_threads_continue(reader_and_data):
  reader, data = reader_and_data
  reader.seek(5000)
  assert _in_thread(lambda: reader.read(100)) == data[5000:5100]  # the other thread never sought
  assert reader.read(100) == data[5100:5200]      # this thread's older seek was handed over, so void
  assert reader.tell() == 5200


def test_many_threads_with_random_seek_read_pairs(reader_and_data):
  reader, data = reader_and_data
  errors = []

  def work(seed):
    rng = random.Random(seed)
    for _ in range(40):
      start, length = rng.randrange(_SIZE), rng.randrange(1, 100_000)
      reader.seek(start)
      time.sleep(0)  # yield the GIL between the pair, as DuckDB's separate seek and read calls do
      got = reader.read(length)
      if got != data[start:start + length]:
        errors.append((seed, start, length))

  threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, f"{len(errors)} reads returned other bytes, first {errors[0]}"


def test_readinto_readline_and_the_end(reader_and_data):
  reader, data = reader_and_data
  buffer = np.zeros(300, np.uint8)
  reader.seek(-200, os.SEEK_END)
  assert reader.readinto(buffer) == 200           # short at the end of the file
  assert buffer[:200].tobytes() == data[-200:] and not buffer[200:].any()
  assert reader.read(10) == b""
  newline = data.index(b"\n", 100_000)
  reader.seek(100_000)
  assert reader.readline() == data[100_000:newline + 1]
  assert reader.tell() == newline + 1
  assert reader.readline(5) == data[newline + 1:newline + 6][:data[newline + 1:newline + 6].find(b"\n") + 1 or 5]
  with pytest.raises(ValueError, match="negative seek"):
    reader.seek(-1)


def test_buffers_of_any_item_size_are_filled_by_bytes(reader_and_data):
  reader, data = reader_and_data
  out = np.zeros(10, np.float64)                  # 80 bytes, len() 10
  reader.seek(333)
  assert reader.readinto(out) == 80 and out.tobytes() == data[333:413]
  rows = np.zeros((4, 100), np.uint8)
  assert reader.readinto(rows) == 400 and rows.tobytes() == data[413:813]
  assert reader.pread(1000, 5) == data[1000:1005] and reader.tell() == 813  # positional: the position stays


def test_line_by_line_reads_fetch_each_block_once(tmp_path_factory, monkeypatch):
  text = b"".join(b"line %d\n" % i for i in range(30_000))  # about 250 KB
  with LocalCluster(tmp_path_factory.mktemp("lines")) as cluster, storage.connect(cluster.address) as client:
    with client.open("/lines.txt", "wb") as f:
      f.write(text)
    fetched = []
    read = client._read
    monkeypatch.setattr(client, "_read", lambda stat, offset, length: fetched.append(length) or read(stat, offset, length))
    with client.open("/lines.txt", "rb", buffering=0) as reader:
      assert list(reader) == text.splitlines(keepends=True)
  assert sum(fetched) < len(text) + SharedReader.READ_AHEAD  # each byte fetched about once, not a block per line


def test_a_closed_reader_refuses_everything(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("closed")) as cluster, storage.connect(cluster.address) as client:
    with client.open("/x", "wb") as f:
      f.write(b"abc")
    reader = client.open("/x", "rb", buffering=0)
    with pytest.raises(ValueError, match="whence"):
      reader.seek(0, 7)
    reader.close()
    for call in (reader.read, reader.tell, reader.seekable, lambda: reader.seek(0)):
      with pytest.raises(ValueError, match="closed file"):
        call()
