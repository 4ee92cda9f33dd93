"""Namespace semantics on every KV backend: tree ops, atomic rename, conflicts, and a meta restart."""

from __future__ import annotations

import errno
import threading

import pytest

from storage.kv import MemoryKV, SqliteKV
from storage.kv.etcd import EtcdKV
from storage.meta import Namespace, split_path


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def ns(request, tmp_path):
  if request.param == "etcd":
    engine = EtcdKV(request.getfixturevalue("etcd_endpoint"))
    engine.post("/v3/kv/deleterange", {"key": "AA==", "range_end": "AA=="})  # start from an empty store
  else:
    engine = MemoryKV() if request.param == "memory" else SqliteKV(tmp_path / "meta.db")
  yield Namespace(engine, chains=range(1, 11), chunk_size=1024, stripe=4)
  engine.close()


def test_tree_operations(ns):
  ns.mkdir("/data/shards", parents=True)
  stat = ns.create("/data/shards/a.bin")
  assert not stat.is_dir and stat.size == 0 and len(stat.layout.chains) == 4
  assert set(stat.layout.chains) <= set(range(1, 11)) and len(set(stat.layout.chains)) == 4
  assert stat.layout.chain_of(5) == stat.layout.chains[1]
  ns.create("/data/shards/b.bin")
  assert ns.listdir("/data/shards") == ["a.bin", "b.bin"] and ns.listdir("/") == ["data"]
  assert ns.stat("/data").is_dir
  with pytest.raises(FileExistsError):
    ns.mkdir("/data")
  with pytest.raises(FileExistsError):
    ns.create("/data/shards/a.bin", exclusive=True)
  with pytest.raises(IsADirectoryError):
    ns.create("/data")
  with pytest.raises(NotADirectoryError):
    ns.create("/data/shards/a.bin/inner")
  with pytest.raises(NotADirectoryError):
    ns.listdir("/data/shards/a.bin")
  with pytest.raises(FileNotFoundError):
    ns.stat("/nope/x")
  with pytest.raises(OSError) as err:
    ns.rmdir("/data/shards")
  assert err.value.errno == errno.ENOTEMPTY
  ns.unlink("/data/shards/a.bin")
  ns.unlink("/data/shards/b.bin")
  ns.rmdir("/data/shards")
  assert ns.listdir("/data") == []
  with pytest.raises(IsADirectoryError):
    ns.unlink("/data")
  ns.create("/f")
  with pytest.raises(NotADirectoryError):
    ns.rmdir("/f")


def test_lengths_sessions_and_truncate(ns):
  inode = ns.create("/log").inode
  session = ns.open_session(inode)
  assert ns.sessions(inode) == 1
  assert ns.close_session(inode, session, 5000).size == 5000
  assert ns.sessions(inode) == 0 and ns.stat("/log").size == 5000
  with pytest.raises(ValueError, match="no open session"):
    ns.close_session(inode, session, 1)
  assert ns.truncate("/log", 10).size == 10
  assert ns.create("/log").size == 0  # open for writing truncates by default


def test_rename_is_atomic_and_refuses_loops(ns):
  ns.mkdir("/a/b/c", parents=True)
  ns.create("/a/file")
  with pytest.raises(ValueError, match="into itself"):
    ns.rename("/a", "/a/b/c/a")
  with pytest.raises(ValueError, match="into itself"):
    ns.rename("/a/b", "/a/b/x")
  ns.rename("/a/b", "/moved")
  assert ns.listdir("/") == ["a", "moved"] and ns.listdir("/moved") == ["c"]
  ns.rename("/moved/c", "/a/b")  # a directory moved back under its old grandparent
  ns.rename("/a/file", "/a/b/file")
  ns.create("/other")
  ns.rename("/other", "/a/b/file")  # replaces a file
  assert ns.listdir("/a/b") == ["file"] and not ns.exists("/other")
  with pytest.raises(NotADirectoryError):
    ns.rename("/moved", "/a/b/file")  # a directory cannot replace a file
  with pytest.raises(OSError):
    ns.rename("/moved", "/a")  # "/a" is not empty
  with pytest.raises(PermissionError):
    ns.rename("/", "/x")


@pytest.mark.parametrize("path", ["relative", "/a/../etc", "/a\0b", "/" + "x" * 300, "/" + "a/" * 3000])
def test_hostile_paths_are_rejected(ns, path):
  with pytest.raises(ValueError):
    ns.create(path)
  assert split_path("/a//b/./c/") == ["a", "b", "c"]


def test_concurrent_creates_in_one_directory(ns):
  ns.mkdir("/dir")
  errors = []

  def writer(worker):
    try:
      for i in range(10):
        ns.create(f"/dir/{worker}-{i}")
    except Exception as err:  # surfaced below
      errors.append(err)

  threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(ns.listdir("/dir")) == 40
  inodes = {ns.stat(f"/dir/{w}-{i}").inode for w in range(4) for i in range(10)}
  assert len(inodes) == 40  # the inode counter never hands out an id twice


def test_meta_restart_loses_nothing_committed(tmp_path):
  engine = SqliteKV(tmp_path / "meta.db")
  ns = Namespace(engine, chains=[1, 2, 3])
  ns.mkdir("/x/y", parents=True)
  inode = ns.create("/x/y/z").inode
  ns.close_session(inode, ns.open_session(inode), 123)
  engine.close()
  again = Namespace(SqliteKV(tmp_path / "meta.db"), chains=[1, 2, 3])
  assert again.stat("/x/y/z").size == 123 and again.listdir("/x") == ["y"]
  assert again.create("/x/new").inode > inode


def test_removed_files_wait_in_the_gc_queue_for_writers_and_the_grace_period(ns):
  kept = ns.create("/kept")
  writing = ns.create("/writing")
  session = ns.open_session(writing.inode)
  ns.create("/gone")
  gone = ns.unlink("/gone")
  ns.unlink("/writing")
  ns.create("/replaced")
  old = ns.stat("/replaced")
  ns.create("/replaced")  # truncate-on-create retires the old inode
  ready = dict(ns.garbage())
  assert set(ready) == {gone.inode, old.inode}  # not /writing: its writer is still open
  assert ready[gone.inode] == gone.layout
  assert ns.garbage(older_than_s=3600) == []  # within the grace period
  closed = ns.close_session(writing.inode, session, 10)  # a removed file's writer closes cleanly
  assert closed.inode == writing.inode
  assert writing.inode in dict(ns.garbage())
  for inode in dict(ns.garbage()):
    ns.forget_garbage(inode)
  assert ns.garbage() == [] and ns.stat("/kept") == kept


def test_truncate_by_inode_follows_renames_and_gc_forgets_dead_writers(ns):
  stat = ns.create("/f")
  ns.rename("/f", "/g")
  assert ns.truncate_inode(stat.inode, 10).size == 10 and ns.stat("/g").size == 10
  session = ns.open_session(stat.inode)  # a writer that will never close
  assert ns.sessions(stat.inode) == 1 and ns.sessions(stat.inode, younger_than_s=0) == 0
  ns.unlink("/g")
  assert ns.garbage() == []
  assert [inode for inode, _ in ns.garbage(session_ttl_s=0)] == [stat.inode]
  assert ns.garbage(session_ttl_s=0, skip=frozenset({stat.inode})) == []
  ns.forget_garbage(stat.inode)
  assert ns.sessions(stat.inode) == 0 and ns.garbage(session_ttl_s=0) == []
  with pytest.raises(FileNotFoundError, match="reclaimed"):  # the dead writer wakes up after all
    ns.close_session(stat.inode, session, 5)
