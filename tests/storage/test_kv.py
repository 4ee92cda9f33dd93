"""The KV seam's shared suite, run against every backend: ops, isolation, conflicts, retries, persistence."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from storage.kv import Conflict, KVError, MemoryKV, ReadOnlyError, SqliteKV, run_transaction
from storage.kv.etcd import EtcdKV


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def engine(request, tmp_path):
  if request.param == "etcd":
    endpoint = request.getfixturevalue("etcd_endpoint")
    kv = EtcdKV(endpoint)
    kv.post("/v3/kv/deleterange", {"key": "AA==", "range_end": "AA=="})  # start empty: delete every key
  else:
    kv = MemoryKV() if request.param == "memory" else SqliteKV(tmp_path / "meta.db")
  yield kv
  kv.close()


def test_get_set_clear_and_ranges(engine):
  with engine.read_write() as txn:
    for key in (b"DENTa", b"DENTb", b"DENTc", b"INOD1"):
      txn.set(key, key.lower())
    assert txn.get(b"DENTb") == b"dentb"  # own writes are visible
  with engine.read_write() as txn:
    txn.clear(b"DENTb")
    txn.set(b"DENTd", b"x")
    assert [k for k, _ in txn.get_range(b"DENT", b"DENU")] == [b"DENTa", b"DENTc", b"DENTd"]
    txn.clear(b"DENTa")  # the limit counts live keys: the store is asked for more than 2 past these clears
    assert [k for k, _ in txn.get_range(b"DENT", b"DENU", limit=2)] == [b"DENTc", b"DENTd"]
    txn.set(b"DENTa", b"denta")
  with engine.read_only() as txn:
    assert txn.get(b"DENTb") is None and txn.get(b"missing") is None
    assert txn.get_range(b"DENT", b"DENU") == [(b"DENTa", b"denta"), (b"DENTc", b"dentc"), (b"DENTd", b"x")]
    assert txn.get_range(b"DENT", b"DENU", limit=1) == [(b"DENTa", b"denta")]
    assert txn.get_range(b"Z", b"ZZ") == []


def test_read_only_refuses_writes_and_finished_transactions_refuse_everything(engine):
  txn = engine.read_only()
  with pytest.raises(ReadOnlyError):
    txn.set(b"k", b"v")
  txn.commit()
  with pytest.raises(KVError, match="already committed"):
    txn.get(b"k")
  with pytest.raises(TypeError, match="keys must be bytes"):
    engine.read_write().get("text")


def test_exception_in_block_cancels(engine):
  with pytest.raises(RuntimeError):
    with engine.read_write() as txn:
      txn.set(b"k", b"v")
      raise RuntimeError("abort")
  with engine.read_only() as txn:
    assert txn.get(b"k") is None


def test_lost_update_is_a_conflict(engine):
  with engine.read_write() as txn:
    txn.set(b"counter", b"0")
  first, second = engine.read_write(), engine.read_write()
  first.set(b"counter", str(int(first.get(b"counter")) + 1).encode())
  second.set(b"counter", str(int(second.get(b"counter")) + 1).encode())
  first.commit()
  with pytest.raises(Conflict):
    second.commit()
  with engine.read_only() as txn:
    assert txn.get(b"counter") == b"1"


def test_phantom_in_a_read_range_is_a_conflict(engine):
  """rmdir reads a directory's entry range; a concurrent create in it must make rmdir fail."""
  remover, creator = engine.read_write(), engine.read_write()
  assert remover.get_range(b"DENT7/", b"DENT70") == []
  remover.clear(b"INOD7")
  creator.set(b"DENT7/file", b"inode 9")
  creator.commit()
  with pytest.raises(Conflict):
    remover.commit()


def test_disjoint_transactions_both_commit(engine):
  a, b = engine.read_write(), engine.read_write()
  a.get(b"a")
  b.get(b"b")
  a.set(b"a", b"1")
  b.set(b"b", b"2")
  a.commit()
  b.commit()


def test_concurrent_increments_with_retry_are_exact(engine):
  def increment(txn):
    value = txn.get(b"n")
    txn.set(b"n", str(int(value or b"0") + 1).encode())

  threads = [threading.Thread(target=lambda: [run_transaction(engine, increment) for _ in range(25)])
             for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert run_transaction(engine, lambda txn: txn.get(b"n"), read_only=True) == b"100"


def test_run_transaction_gives_up_after_max_attempts(engine):
  def always_conflicts(txn):
    raise Conflict("forced")

  with pytest.raises(Conflict, match="forced"):
    run_transaction(engine, always_conflicts, max_attempts=3, backoff_s=0)


def _increment_in_process(path: str, times: int) -> None:
  kv = SqliteKV(path)
  for _ in range(times):
    run_transaction(kv, lambda txn: txn.set(b"n", str(int(txn.get(b"n") or b"0") + 1).encode()))
  kv.close()


def test_sqlite_is_safe_across_processes_and_durable(tmp_path):
  path = tmp_path / "meta.db"
  SqliteKV(path).close()
  procs = [multiprocessing.get_context("spawn").Process(target=_increment_in_process, args=(str(path), 20))
           for _ in range(3)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(timeout=120)
  assert all(p.exitcode == 0 for p in procs)
  reopened = SqliteKV(path)
  assert run_transaction(reopened, lambda txn: txn.get(b"n"), read_only=True) == b"60"
  assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  reopened.close()


def test_sqlite_purges_old_tombstones_and_old_readers_conflict(tmp_path, monkeypatch):
  from storage.kv import sqlite as sqlite_kv
  monkeypatch.setattr(sqlite_kv, "PURGE_EVERY", 4)
  engine = SqliteKV(tmp_path / "kv.db")
  run_transaction(engine, lambda txn: txn.set(b"k", b"v"))  # version 1
  old = engine.read_write()
  assert old.get(b"k") == b"v"
  for i in range(12):  # create and delete keys: tombstones pile up, then get purged
    run_transaction(engine, lambda txn: txn.set(b"t%d" % i, b"x"))
    run_transaction(engine, lambda txn: txn.clear(b"t%d" % i))
  tombstones = sqlite3.connect(tmp_path / "kv.db").execute("SELECT COUNT(*) FROM kv WHERE value IS NULL").fetchone()[0]
  assert tombstones < 12
  old.set(b"k", b"w")
  with pytest.raises(Conflict):  # it began before the horizon: it might have missed a purged delete
    old.commit()
  blind = engine.read_write()  # a transaction that read nothing needs no tombstone
  run_transaction(engine, lambda txn: txn.set(b"z", b"1"))
  blind.set(b"k", b"blind")
  blind.commit()
  assert run_transaction(engine, lambda txn: txn.get(b"k"), read_only=True) == b"blind"
  engine.close()


def test_open_kv_names_an_engine_by_its_flag_text(tmp_path, etcd_endpoint):
  from storage.kv import open_kv
  assert isinstance(open_kv("memory"), MemoryKV)
  sqlite = open_kv(f"sqlite:{tmp_path / 'kv.db'}")
  assert isinstance(sqlite, SqliteKV)
  sqlite.close()
  etcd = open_kv(etcd_endpoint.replace("http://", "etcd://"))
  assert isinstance(etcd, EtcdKV)
  etcd.close()
  for bad in ("", "sqlite:", "etcd://", "redis://x", "MEMORY"):
    with pytest.raises(ValueError, match="sqlite:PATH, etcd://HOST:PORT or memory"):
      open_kv(bad)
