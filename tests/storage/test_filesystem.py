"""The `3fs` fsspec filesystem on a local cluster: fsspec.open URLs, parquet through pyarrow, DuckDB's read_parquet, ls/info/mv/rm."""

from __future__ import annotations

import errno
import os
import threading
import time

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.filesystem import StorageFileSystem
from tests.storage.local_cluster import LocalCluster


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("cluster"), gc_delay_s=0.0) as cluster:
    filesystem = fsspec.filesystem("3fs", address=cluster.address)
    yield filesystem
    filesystem.close()


def test_urls_open_through_the_entry_point(fs):
  url = f"3fs://{fs.address}/urls/hello.txt"
  fs.makedirs("/urls", exist_ok=True)
  with fsspec.open(url, "w") as f:  # text mode on top of the binary file
    f.write("hello, 3fs\n" * 1000)
  with fsspec.open(url, "r") as f:
    assert f.read() == "hello, 3fs\n" * 1000
  assert isinstance(fsspec.open(url).fs, StorageFileSystem)
  assert fs.cat_file("/urls/hello.txt", start=7, end=10) == b"3fs"
  assert fs.cat_file(url, start=-4) == b"3fs\n"
  assert fs.cat_file(url, start=-10**9) == fs.cat_file(url)
  with pytest.raises(ValueError, match="is on cluster 10.0.0.1:1"):
    fs.info("3fs://10.0.0.1:1/urls/hello.txt")


def test_parquet_with_pyarrow_and_duckdb(fs):
  table = pa.table({"key": list(range(10_000)), "value": [f"v{i % 97}" for i in range(10_000)]})
  fs.makedirs("/parquet", exist_ok=True)
  pq.write_table(table, "/parquet/t.parquet", filesystem=fs, row_group_size=1000)
  assert pq.read_table("/parquet/t.parquet", filesystem=fs).equals(table)

  con = duckdb.connect()
  con.register_filesystem(fs)
  for _ in range(5):  # DuckDB's threads share one handle; a racy reader fails about every other query
    got = con.execute(f"select count(*), sum(key), count(distinct value) from read_parquet('3fs://{fs.address}"
                      "/parquet/t.parquet')").fetchone()
    assert got == (10_000, sum(range(10_000)), 97)
  con.execute(f"copy (select key * 2 as doubled from range(5) t(key)) to '3fs://{fs.address}/parquet/d.parquet' "
          "(format parquet)")
  assert pq.read_table("/parquet/d.parquet", filesystem=fs).column("doubled").to_pylist() == [0, 2, 4, 6, 8]


def test_ls_info_mv_rm(fs):
  fs.makedirs("/tree/sub", exist_ok=True)
  fs.pipe_file("/tree/a.bin", b"x" * 300_000)  # several chunks
  fs.pipe_file("/tree/sub/b.bin", b"y")
  assert fs.ls("/tree", detail=False) == ["/tree/a.bin", "/tree/sub"]
  info = fs.info(f"3fs://{fs.address}/tree/a.bin")
  assert (info["name"], info["size"], info["type"]) == ("/tree/a.bin", 300_000, "file")
  assert fs.info("/tree/sub")["type"] == "directory"
  assert fs.find("/tree") == ["/tree/a.bin", "/tree/sub/b.bin"]

  fs.mv("/tree/sub", "/tree/moved")  # a directory in one atomic rename
  assert fs.ls("/tree", detail=False) == ["/tree/a.bin", "/tree/moved"]
  assert fs.cat_file("/tree/moved/b.bin") == b"y"

  with pytest.raises(FileNotFoundError):
    fs.info("/tree/sub")
  fs.rm("/tree", recursive=True)
  assert not fs.exists("/tree")


def test_an_address_is_required():
  with pytest.raises(ValueError, match="address"):
    StorageFileSystem(skip_instance_cache=True)


def test_mv_into_a_directory_rm_and_rmdir_errors(fs):
  fs.makedirs("/many/into", exist_ok=True)
  for name in ("a.txt", "b.txt", "c.bin"):
    fs.pipe_file(f"/many/{name}", name.encode())
  fs.mv("/many/*.txt", "/many/into")                     # a glob: each under its own name
  assert fs.ls("/many/into", detail=False) == ["/many/into/a.txt", "/many/into/b.txt"]
  fs.mv(["/many/c.bin"], "/many/into/")
  assert fs.cat_file("/many/into/c.bin") == b"c.bin"
  with pytest.raises(NotADirectoryError):
    fs.mv(["/many/into/c.bin"], "/many/missing")
  with pytest.raises(OSError) as err:
    fs.rmdir("/many")                                    # ENOTEMPTY crosses the wire as an OSError
  assert err.value.errno == errno.ENOTEMPTY
  with pytest.raises(IsADirectoryError):
    fs.rm("/many")
  fs.rm("/many", recursive=True)
  assert not fs.exists("/many")


def test_instances_in_other_threads_share_one_client(fs):
  others = []
  thread = threading.Thread(target=lambda: others.append(fsspec.filesystem("3fs", address=fs.address)))
  thread.start()
  thread.join()
  assert others[0] is not fs and others[0].client is fs.client  # fsspec caches per thread; the client is shared
  others[0].close()
  assert fs.exists("/")                                  # the other instance's close left this one's client open


def test_mv_onto_a_directory_moves_into_it_and_cp_copies(fs):
  fs.makedirs("/onto/dir", exist_ok=True)
  fs.pipe_file("/onto/f.bin", b"f" * 200_000)
  fs.mv("/onto/f.bin", "/onto/dir")                        # an existing directory: into it
  assert fs.ls("/onto/dir", detail=False) == ["/onto/dir/f.bin"]
  fs.cp_file("/onto/dir/f.bin", "/onto/copy.bin")
  assert fs.cat_file("/onto/copy.bin") == b"f" * 200_000
  fs.copy("/onto/dir", "/onto/dir2", recursive=True)
  assert fs.cat_file("/onto/dir2/f.bin") == b"f" * 200_000
  fs.rm("/onto", recursive=True)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child touches no JAX, only the cluster
def test_a_closed_filesystem_refuses_and_a_forked_child_connects_anew(fs):
  other = StorageFileSystem(fs.address, skip_instance_cache=True)
  other.close()
  other.close()                                             # idempotent
  with pytest.raises(ValueError, match="closed"):
    other.ls("/")
  assert fs.exists("/")                                     # the shared client stays open for fs
  fs.pipe_file("/forked.txt", b"from the parent")
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: fsspec makes a new instance (the pid changed), which must not reuse the parent's client
    try:
      child = fsspec.filesystem("3fs", address=fs.address)
      os.write(write, child.cat_file("/forked.txt"))
    finally:
      os._exit(0)
  os.close(write)
  deadline = time.monotonic() + 30
  while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
  if done[0] == 0:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
  assert os.read(read, 100) == b"from the parent", "the forked child hung or failed"
