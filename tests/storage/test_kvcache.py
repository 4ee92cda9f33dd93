"""The KV-cache store on a loopback cluster: round trips, prefix hits, LRU eviction, crashed and late
writers, pending keys removed mid-write, readers racing eviction, bad input, engines that cap a
transaction, and several processes sharing one store."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import numpy as np
import pytest

import storage
import storage.kvcache
import storage.kvcache_index
from storage.kv import EtcdKV, MemoryKV, SqliteKV
from storage.kvcache import KVCacheStore, prefix_hashes
from storage.kvcache_index import Index, _unpack
from tests.storage.local_cluster import LocalCluster

PAGE = 4096


def page_of(key: bytes) -> bytes:
  """A page that names its key: a read of the wrong page is loud."""
  return (key * (PAGE // len(key) + 1))[:PAGE]


def key(i: int) -> bytes:
  return f"key-{i:04d}".encode().ljust(16, b".")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
    yield c


@pytest.fixture(scope="module")
def client(cluster):
  with storage.connect(cluster.address) as c:
    yield c


@pytest.fixture
def make_store(client, tmp_path, request):
  """A store under a root of its own, over a SQLite index in the test's directory."""
  kv = SqliteKV(tmp_path / "index.db")
  count = iter(range(100))
  def make(**kwargs) -> KVCacheStore:
    kwargs.setdefault("page_bytes", PAGE)
    kwargs.setdefault("touch_interval_s", 0.0)
    root = kwargs.pop("root", f"/{request.node.name}-{next(count)}")
    return KVCacheStore(client, kv, root, **kwargs)
  yield make
  kv.close()


def test_prefix_hashes_chain_full_blocks():
  tokens = np.arange(10)
  keys = prefix_hashes(tokens, 4)
  assert len(keys) == 2 and all(len(k) == 16 for k in keys)  # the partial last block gets no key
  assert prefix_hashes(list(range(10)), 4) == keys  # a list and an array agree
  assert prefix_hashes(tokens[4:], 4, parent=keys[0]) == keys[1:]  # a chain continues from its parent
  other = tokens.copy()
  other[0] = 99
  changed = prefix_hashes(other, 4)
  assert changed[0] != keys[0] and changed[1] != keys[1]  # a key pins its whole prefix
  assert prefix_hashes(tokens[4:8], 4) != keys[1:]  # the same block after another prefix differs
  assert prefix_hashes(tokens[:3], 4) == []
  with pytest.raises(ValueError, match="block_size"):
    prefix_hashes(tokens, 0)
  with pytest.raises(ValueError, match="parent"):
    prefix_hashes(tokens, 4, parent=b"short")
  with pytest.raises(ValueError, match="tokens"):
    prefix_hashes(np.zeros((2, 4), np.int32), 4)


def test_put_get_round_trip_and_batched_reads(make_store):
  store = make_store(capacity_pages=8, num_files=3)
  assert store.put(key(0), page_of(key(0)))
  assert store.put(key(1), np.frombuffer(page_of(key(1)), np.uint32))  # any dtype of page_bytes bytes
  assert not store.put(key(0), page_of(key(0)))  # cached already: not rewritten
  assert store.get(key(0)) == page_of(key(0)) and store.get(key(1)) == page_of(key(1))
  assert store.get(key(9)) is None
  stored = store.put_many([key(i) for i in range(2, 6)], np.stack([np.frombuffer(page_of(key(i)), np.uint8)
                                                                   for i in range(2, 6)]))
  assert stored.tolist() == [True] * 4
  out = np.full((4, PAGE), 0xAB, np.uint8)
  found, pages = store.get_many([key(5), key(9), key(2), key(5)], out=out)
  assert pages is out and found.tolist() == [True, False, True, True]
  assert out[0].tobytes() == page_of(key(5)) and out[2].tobytes() == page_of(key(2))
  assert (out[1] == 0xAB).all()  # a miss leaves its row alone
  stats = store.stats()
  assert (stats.capacity_pages, stats.used_pages, stats.evictions) == (8, 6, 0)
  assert (stats.hits, stats.misses) == (5, 2)
  for i, path in enumerate(store._paths):  # slots spread round robin over preallocated files
    slots = (8 - i + 2) // 3
    assert store.client.stat(path).size == slots * store.slot_bytes


def test_adjacent_slots_are_read_and_written_as_runs(make_store, monkeypatch):
  store = make_store(capacity_pages=8)
  keys = [key(i) for i in range(6)]
  store.put_many(keys, [page_of(k) for k in keys])  # fresh slots 0..5, side by side
  store.delete(keys[2])
  assert store.put(key(9), page_of(key(9)))  # into the freed slot 2: a different page mid-run
  reads = []
  original = storage.kvcache.IoRing.prepare
  def counting(ring, path, offset, length, *args, **kwargs):
    reads.append((offset, length))
    return original(ring, path, offset, length, *args, **kwargs)
  monkeypatch.setattr(storage.kvcache.IoRing, "prepare", counting)
  wanted = [keys[5], keys[0], key(9), keys[1], keys[2], keys[3]]
  found, pages = store.get_many(wanted)
  assert found.tolist() == [True, True, True, True, False, True]
  assert all(pages[i].tobytes() == page_of(k) for i, k in enumerate(wanted) if found[i])
  assert reads == [(0, 4 * store.slot_bytes), (5 * store.slot_bytes, store.slot_bytes)]  # slots 0-3, then 5


def test_batch_exists_counts_the_cached_prefix(make_store):
  store = make_store(capacity_pages=8)
  keys = [key(i) for i in range(5)]
  store.put_many([keys[0], keys[1], keys[3]], [page_of(keys[0]), page_of(keys[1]), page_of(keys[3])])
  assert store.batch_exists(keys) == 2  # stops at the first miss: keys[3] does not count
  assert store.batch_exists(keys[3:4]) == 1 and store.batch_exists([]) == 0
  assert store.exists(keys[1]) and not store.exists(keys[2])


def test_delete_and_clear_free_slots_for_reuse(make_store):
  store = make_store(capacity_pages=4)
  store.put_many([key(i) for i in range(4)], [page_of(key(i)) for i in range(4)])
  assert store.delete(key(0)) and not store.delete(key(0))
  assert store.get(key(0)) is None and store.stats().used_pages == 3
  assert store.put(key(7), page_of(key(7)))  # the freed slot, not an eviction
  assert store.stats().evictions == 0 and store.get(key(7)) == page_of(key(7))
  assert_index_consistent(store)
  assert store.clear(batch=3) == 4
  assert store.stats().used_pages == 0 and store.batch_exists([key(1)]) == 0
  assert store.put_many([key(i) for i in range(10, 14)], [page_of(key(i)) for i in range(10, 14)]).all()
  assert store.stats().evictions == 0


def test_full_store_evicts_the_least_recently_used(make_store):
  store = make_store(capacity_pages=4)
  for i in range(4):
    store.put(key(i), page_of(key(i)))
  assert store.get(key(0)) == page_of(key(0))  # key 0 is now the most recently used
  assert store.put(key(4), page_of(key(4)))
  assert not store.exists(key(1))  # the oldest unused page went
  assert all(store.get(key(i)) == page_of(key(i)) for i in (0, 2, 3, 4))
  assert store.stats().evictions == 1 and store.stats().used_pages == 4
  # A batch never evicts its own pages: with room for 4, the fifth waits for a later call.
  stored = store.put_many([key(i) for i in range(20, 25)], [page_of(key(i)) for i in range(20, 25)])
  assert stored.sum() == 4 and store.stats().evictions == 5
  assert_index_consistent(store)


def test_reader_racing_eviction_reads_a_miss_never_another_page(make_store):
  store = make_store(capacity_pages=1)
  store.put(key(0), page_of(key(0)))
  entries = store._index.lookup([key(0)])  # a reader looked key 0 up ...
  assert store.put(key(1), page_of(key(1)))  # ... then it was evicted and its slot rewritten ...
  staging, _, status = store._read_slots([key(0)], entries)  # ... before the reader's data read
  assert staging[0, :PAGE].tobytes() == page_of(key(1))  # the race did happen: key 1's bytes came back
  assert status == [1]  # and the trailer check rejects them
  store._after_read([key(0)], entries, status)  # the entry changed: key 1's page is not dropped
  assert store.get(key(1)) == page_of(key(1)) and store.stats().dropped == 0


class _Clock:
  """`time` for the store's modules with an offset the test moves: a timeout is crossed when the
  test says, not when a loaded machine happens to stall."""

  def __init__(self):
    self.offset_ns = 0

  def time_ns(self) -> int:
    return time.time_ns() + self.offset_ns

  def sleep(self, seconds: float) -> None:
    time.sleep(seconds)

  def advance(self, seconds: float) -> None:
    self.offset_ns += int(seconds * 1e9)


@pytest.fixture
def clock(monkeypatch):
  fake = _Clock()
  monkeypatch.setattr(storage.kvcache_index, "time", fake)
  monkeypatch.setattr(storage.kvcache, "time", fake)
  return fake


def test_crashed_writer_slot_is_reclaimed_and_a_late_write_is_harmless(make_store, clock):
  store = make_store(capacity_pages=1, pending_timeout_s=30)
  index = store._index
  crashed = index.allocate([key(0)], capacity=1, pending_timeout_s=30, instance=b"w" * 16)
  assert crashed[0] is not None and not store.exists(key(0)) and store.get(key(0)) is None  # pending: invisible
  assert not store.put(key(1), page_of(key(1)))  # the only slot is being written: not handed out
  assert not store.put(key(0), page_of(key(0)))  # nor the key another writer holds
  clock.advance(31)
  assert store.put(key(1), page_of(key(1)))  # past the timeout the slot is recycled
  assert store.stats().reclaimed == 1 and store.get(key(1)) == page_of(key(1))
  # The "crashed" writer was only slow: its write lands on the recycled slot, its confirm fails.
  late = page_of(key(0))
  store._write_slots([crashed[0].slot], [late + store._trailer(key(0), crashed[0].nonce, late)])
  assert index.confirm([key(0)], crashed) == [False] and not store.exists(key(0))
  assert store.get(key(1)) is None  # key 1's page is gone, but no other page's bytes are returned
  assert store.stats().dropped == 1 and not store.exists(key(1))  # and the damaged entry left the index
  assert store.put(key(1), page_of(key(1))) and store.get(key(1)) == page_of(key(1))
  assert_index_consistent(store)


@pytest.mark.parametrize("removal", ["delete", "clear", "failed write"])
def test_removing_a_pending_key_quarantines_its_slot_until_the_timeout(make_store, clock, removal):
  store = make_store(capacity_pages=1, pending_timeout_s=30)
  x, y = key(0), key(1)
  if removal == "failed write":
    writes = []
    def failing(slots, blobs):  # the first chunk write failed; another may still be in flight
      writes.append((slots, blobs))
      raise OSError("write failed")
    store._write_slots = failing
    with pytest.raises(OSError):
      store.put(x, page_of(x))
    del store._write_slots
    (slots, blobs), = writes
  else:
    (entry,) = store._index.allocate([x], capacity=1, pending_timeout_s=30, instance=b"w" * 16)
    assert (store.delete(x) if removal == "delete" else store.clear()) in (True, 1)
    slots, blobs = [entry.slot], [page_of(x) + store._trailer(x, entry.nonce, page_of(x))]
  assert not store.exists(x) and store.stats().used_pages == 1
  assert not store.put(y, page_of(y))  # the only slot may still be written: not handed out
  store._write_slots(slots, blobs)  # the removed writer's write lands late, harming no one
  assert_index_consistent(store)
  clock.advance(31)
  assert store.put(y, page_of(y)) and store.get(y) == page_of(y)  # past the timeout it is recycled
  assert store.stats().reclaimed == 0 and store.stats().dropped == 0
  assert_index_consistent(store)


def test_young_pending_pages_do_not_hide_evictable_ones(make_store):
  store = make_store(capacity_pages=20)
  others = store._index.allocate([key(100 + i) for i in range(16)], capacity=20, pending_timeout_s=30,
                                 instance=b"o" * 16)  # the 16 oldest slots are being written
  assert all(e is not None for e in others)
  assert store.put_many([key(i) for i in range(4)], [page_of(key(i)) for i in range(4)]).all()
  assert store.put(key(50), page_of(key(50)))  # evicts a ready page past the pending ones
  assert store.stats().evictions == 1 and not store.exists(key(0)) and store.get(key(50)) == page_of(key(50))
  assert_index_consistent(store)


def test_a_failed_lru_stamp_does_not_fail_the_read(client, tmp_path):
  kv = SqliteKV(tmp_path / "locked.db", busy_timeout_s=0.1)
  store = KVCacheStore(client, kv, f"/locked-{tmp_path.name}", page_bytes=PAGE, capacity_pages=2,
                       touch_interval_s=0.0)
  store.put(key(0), page_of(key(0)))
  holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
  holder.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
  try:
    assert store.get(key(0)) == page_of(key(0))  # the stamp is dropped ("database is locked"), not raised
    assert store.get_many([key(0), key(1)]).found.tolist() == [True, False]
  finally:
    holder.execute("ROLLBACK")
    holder.close()
    kv.close()


def test_root_spellings_name_one_store(make_store):
  a = make_store(root="/spelled", capacity_pages=2)
  b = make_store(root="//spelled/./sub/..//", capacity_pages=2)
  assert b.root == a.root == "/spelled" and b._paths == a._paths
  assert a.put(key(0), page_of(key(0))) and b.put(key(1), page_of(key(1)))  # one index: distinct slots
  assert a.get(key(0)) == page_of(key(0)) and b.get(key(0)) == page_of(key(0)) and a.get(key(1)) == page_of(key(1))


def test_reopening_adopts_num_files_and_pending_timeout(make_store):
  made = make_store(root="/adopt", capacity_pages=8, num_files=3, pending_timeout_s=5.0)
  made.put(key(0), page_of(key(0)))
  for kwargs in ({"page_bytes": None, "capacity_pages": None}, {"capacity_pages": 8}):
    reopened = make_store(root="/adopt", **kwargs)
    assert (reopened.num_files, reopened.pending_timeout_s) == (3, 5.0)  # every process agrees on them
    assert reopened.get(key(0)) == page_of(key(0))
  with pytest.raises(ValueError, match="num_files"):
    make_store(root="/adopt", capacity_pages=8, num_files=2)
  with pytest.raises(ValueError, match="pending_timeout_s"):
    make_store(root="/adopt", capacity_pages=8, pending_timeout_s=30.0)
  fresh = make_store(capacity_pages=2)
  assert (fresh.num_files, fresh.pending_timeout_s) == (1, 30.0)  # a new store's defaults


def test_put_many_takes_any_numeric_array_with_a_page_per_row(make_store):
  store = make_store(capacity_pages=8)
  keys = [key(i) for i in range(6)]
  pages = np.stack([np.frombuffer(page_of(k), np.uint8) for k in keys])
  assert store.put_many(keys[:2], pages[:2].view(np.uint32)).all()  # [2, PAGE / 4] uint32
  assert store.put_many(keys[2:4], pages[2:4].view(np.int8).reshape(2, 2, PAGE // 2)).all()  # 3-D int8
  assert store.put_many(keys[4:], list(pages[4:].view(np.float16))).all()  # a sequence of pages
  assert all(store.get(k) == page_of(k) for k in keys)
  for bad in (np.empty((1, PAGE), object), np.zeros((1, PAGE), "S1"), np.zeros((2, PAGE), np.uint8),
              np.zeros((1, 2, PAGE), np.uint8), np.zeros(PAGE, np.uint8)):
    with pytest.raises(ValueError, match="pages"):
      store.put_many([key(9)], bad)
  with pytest.raises(ValueError, match="page"):
    store.put(key(9), np.empty(PAGE, object))


def test_bad_input_raises_value_error_naming_the_argument(make_store, client):
  store = make_store(capacity_pages=2)
  with pytest.raises(ValueError, match="page"):
    store.put(key(0), b"x" * (PAGE - 1))
  with pytest.raises(ValueError, match="page"):
    store.put(key(0), [0] * PAGE)
  with pytest.raises(ValueError, match="key"):
    store.put("text", page_of(key(0)))
  with pytest.raises(ValueError, match="key"):
    store.get(b"")
  with pytest.raises(ValueError, match="distinct"):
    store.put_many([key(0), key(0)], [page_of(key(0))] * 2)
  with pytest.raises(ValueError, match="pages"):
    store.put_many([key(0), key(1)], np.zeros((2, PAGE // 2), np.int8))  # rows of half a page
  with pytest.raises(ValueError, match="pages"):
    store.put_many([key(0), key(1)], [page_of(key(0))])
  with pytest.raises(ValueError, match="out"):
    store.get_many([key(0)], out=np.zeros((2, PAGE), np.uint8))
  for kwargs, name in (({"capacity_pages": 0}, "capacity_pages"), ({"page_bytes": -1}, "page_bytes"),
                       ({"num_files": 0}, "num_files"), ({"num_files": 3}, "num_files"),
                       ({"pending_timeout_s": 0}, "pending_timeout_s"),
                       ({"pending_timeout_s": float("inf")}, "pending_timeout_s"),
                       ({"pending_timeout_s": float("nan")}, "pending_timeout_s"),
                       ({"pending_timeout_s": "30"}, "pending_timeout_s"),
                       ({"touch_interval_s": -1}, "touch_interval_s"),
                       ({"touch_interval_s": float("inf")}, "touch_interval_s"),
                       ({"touch_interval_s": None}, "touch_interval_s"),
                       ({"root": "relative"}, "root"), ({"root": "./x"}, "root")):
    with pytest.raises(ValueError, match=name):
      make_store(**{"capacity_pages": 2, **kwargs})
  root = store.root
  with pytest.raises(ValueError, match="page_bytes"):  # an existing store's geometry is fixed
    make_store(root=root, capacity_pages=2, page_bytes=2 * PAGE)
  with pytest.raises(ValueError, match="capacity_pages"):
    make_store(root=root, capacity_pages=3)
  with pytest.raises(ValueError, match="page_bytes"):  # None adopts, but there is nothing to adopt
    make_store(page_bytes=None, capacity_pages=None)
  store.put(key(0), page_of(key(0)))
  reopened = make_store(root=root, page_bytes=None, capacity_pages=None)
  assert reopened.capacity_pages == 2 and reopened.get(key(0)) == page_of(key(0))  # reopening keeps pages


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def engine(request, tmp_path):
  if request.param == "etcd":
    kv = EtcdKV(request.getfixturevalue("etcd_endpoint"))
  else:
    kv = MemoryKV() if request.param == "memory" else SqliteKV(tmp_path / "index.db")
  yield kv
  kv.close()


def test_index_protocol_on_every_kv_engine(engine, tmp_path):
  index = Index(engine, b"kvcache\0/" + tmp_path.name.encode() + b"\0")  # etcd is shared by the session
  keys = [key(i) for i in range(3)]
  entries = index.allocate(keys, capacity=2, pending_timeout_s=30, instance=b"i" * 16)
  assert [e is not None for e in entries] == [True, True, False]
  assert sorted(e.slot for e in entries[:2]) == [0, 1] and index.lookup(keys) == [None] * 3
  assert index.confirm(keys[:2], entries[:2]) == [True, True]
  assert index.leading_ready(keys) == 2 and index.usage() == (2, 0, 0)
  third = index.allocate(keys[2:], capacity=2, pending_timeout_s=30, instance=b"i" * 16)
  assert third[0].slot == entries[0].slot  # the least recently used slot (confirmed first)
  assert index.confirm(keys[2:], third) == [True] and index.lookup(keys[:1]) == [None]
  assert index.usage() == (2, 1, 0) and index.delete(keys) == 2 and index.usage() == (0, 1, 0)


class _CappedKV(MemoryKV):
  """A MemoryKV that fails a read-write transaction reading or writing over 40 keys, as etcd over 128."""

  max_ops_per_transaction = 40

  def read_write(self):
    txn = super().read_write()
    def commit(writes, original=txn._commit):
      if len(writes) > 40 or len(txn._read_keys) + len(txn._read_ranges) > 40:
        raise AssertionError(f"{len(txn._read_keys)} reads and {len(writes)} writes in one transaction")
      original(writes)
    txn._commit = commit
    return txn


@pytest.mark.parametrize("capped", ["memory", "etcd"])
def test_batches_are_split_for_engines_that_cap_a_transaction(client, request, capped):
  assert EtcdKV.max_ops_per_transaction == 128 and MemoryKV.max_ops_per_transaction is None
  kv = EtcdKV(request.getfixturevalue("etcd_endpoint")) if capped == "etcd" else _CappedKV()
  store = KVCacheStore(client, kv, f"/capped-{capped}-{time.time_ns()}", page_bytes=PAGE, capacity_pages=64,
                       touch_interval_s=0.0)  # etcd is shared by the session: a root of its own
  keys = [key(i) for i in range(64)]
  assert store.put_many(keys, [page_of(k) for k in keys]).all()
  assert store.get_many(keys).found.all()  # and its LRU stamps
  others = [key(100 + i) for i in range(64)]
  assert store.put_many(others, [page_of(k) for k in others]).all()  # 64 evictions
  assert store.stats().evictions == 64 and store.delete_many(others[:50]) == 50
  assert store.clear() == 14 and store.stats().used_pages == 0
  kv.close()


def assert_index_consistent(store: KVCacheStore) -> None:
  """Every slot below the high-water mark is free, held by exactly one entry with its LRU record,
  or quarantined (a pending LRU record no entry owns: a removed write's)."""
  index = store._index
  with index.engine.read_only() as txn:
    raw = txn.get(index.prefix + b"N")
    handed_out = 0 if raw is None else int.from_bytes(raw, "big")
    free = [int.from_bytes(k[-4:], "big") for k, _ in txn.get_range(*index._range(b"F"))]
    entries = {k[len(index.prefix) + 1:]: _unpack(v) for k, v in txn.get_range(*index._range(b"K"))}
    lru = {k: v for k, v in txn.get_range(*index._range(b"L"))}
  owned = {index._l(e): bytes([e.ready]) + k for k, e in entries.items()}
  quarantined = [int.from_bytes(k[-4:], "big") for k, v in lru.items() if k not in owned]
  assert all(lru[k][0] == 0 for k in lru if k not in owned)
  held = [e.slot for e in entries.values()] + quarantined
  assert sorted(free + held) == list(range(handed_out)) and handed_out <= store.capacity_pages
  assert {k: v for k, v in lru.items() if k in owned} == owned


def _hammer(address: str, kv_path: str, root: str, seed: int, ops: int, queue) -> None:
  """One process of the shared-store test: random puts, batched gets, prefix checks, deletes."""
  try:
    rng = np.random.default_rng(seed)
    kv = SqliteKV(kv_path)
    counts = {"hits": 0, "stored": 0, "reads": 0}
    with storage.connect(address) as client:
      store = KVCacheStore(client, kv, root, page_bytes=PAGE, capacity_pages=12, touch_interval_s=0.0)
      for _ in range(ops):
        picked = [key(int(i)) for i in rng.choice(30, size=4, replace=False)]
        action = rng.random()
        if action < 0.4:
          counts["stored"] += int(store.put_many(picked, [page_of(k) for k in picked]).sum())
        elif action < 0.9:
          found, pages = store.get_many(picked)
          counts["reads"] += len(picked)
          for k, hit, page in zip(picked, found, pages):
            if hit and page.tobytes() != page_of(k):
              raise AssertionError(f"get_many({k!r}) returned another page: {page[:16].tobytes()!r}")
            counts["hits"] += int(hit)
          store.batch_exists(picked)
        else:
          store.delete(picked[0])
    kv.close()
    queue.put(("ok", counts))
  except BaseException as err:  # the parent asserts on it
    queue.put(("error", repr(err)))


def test_processes_share_one_store_and_never_read_a_wrong_page(cluster, client, tmp_path):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  KVCacheStore(client, SqliteKV(tmp_path / "index.db"), "/shared", page_bytes=PAGE, capacity_pages=12)
  procs = [ctx.Process(target=_hammer, args=(cluster.address, str(tmp_path / "index.db"), "/shared", seed, 80,
                                             queue)) for seed in range(3)]
  for p in procs:
    p.start()
  results = [queue.get(timeout=120) for _ in procs]
  for p in procs:
    p.join(timeout=30)
  assert all(kind == "ok" for kind, _ in results), results
  counts = [c for _, c in results]
  assert sum(c["stored"] for c in counts) > 12 and sum(c["hits"] for c in counts) > 0  # evictions and hits happened
  store = KVCacheStore(client, SqliteKV(tmp_path / "index.db"), "/shared")
  assert_index_consistent(store)
  assert store.stats().used_pages == 12 and store.stats().evictions > 0
