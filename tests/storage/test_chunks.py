"""The chunk store: CRAQ versions, partial writes, checksums, crash-safe files, resync replace."""

from __future__ import annotations

import pytest

from storage.chunks import ChunkCorrupted, ChunkError, ChunkId, ChunkNotFound, ChunkStore, PendingWrite
from storage.cluster.resync import ChunkMeta

CHUNK = ChunkId(inode=42, index=3)


@pytest.fixture
def store(tmp_path):
  s = ChunkStore(tmp_path / "target", chunk_size=64)
  yield s
  s.close()


def test_write_is_pending_until_committed(store):
  version = store.prepare(CHUNK, 0, b"hello", chain_version=1)
  assert version == 1 and store.meta(CHUNK) == ChunkMeta(1, 0, 1)
  with pytest.raises(PendingWrite):
    store.read(CHUNK)
  assert store.read(CHUNK, relaxed=True) == b"hello"
  with pytest.raises(PendingWrite):  # one write at a time per chunk
    store.prepare(CHUNK, 0, b"x", chain_version=1)
  store.commit(CHUNK, version, chain_version=1)
  assert store.read(CHUNK) == b"hello" and store.meta(CHUNK) == ChunkMeta(1, 1, 1)


def test_partial_writes_holes_and_ranges(store):
  store.commit(CHUNK, store.prepare(CHUNK, 0, b"abcdef", 1), 1)
  store.commit(CHUNK, store.prepare(CHUNK, 2, b"XY", 1), 1)
  store.commit(CHUNK, store.prepare(CHUNK, 10, b"!", 2), 2)
  assert store.read(CHUNK) == b"abXYef\0\0\0\0!"
  assert store.read(CHUNK, 2, 3) == b"XYe"
  assert store.meta(CHUNK) == ChunkMeta(2, 3, 3)
  assert len(list((store.root / "data").iterdir())) == 1  # old versions are gone
  with pytest.raises(ValueError, match="does not fit"):
    store.prepare(CHUNK, 60, b"too long", 2)


def test_abort_drops_the_pending_version(store):
  store.commit(CHUNK, store.prepare(CHUNK, 0, b"keep", 1), 1)
  store.prepare(CHUNK, 0, b"drop", 1)
  store.abort(CHUNK)
  assert store.read(CHUNK) == b"keep"
  fresh = ChunkId(1, 0)
  store.prepare(fresh, 0, b"new", 1)
  store.abort(fresh)
  assert store.meta(fresh) is None
  with pytest.raises(ChunkNotFound):
    store.read(fresh)
  with pytest.raises(ChunkError, match="no pending version"):
    store.commit(CHUNK, 9, 1)


def test_corruption_is_detected(store):
  store.commit(CHUNK, store.prepare(CHUNK, 0, b"precious bytes", 1), 1)
  path = store._path(CHUNK, 1)
  path.write_bytes(b"precious bytez")
  with pytest.raises(ChunkCorrupted, match="checksum"):
    store.read(CHUNK)
  path.unlink()
  with pytest.raises(ChunkCorrupted, match="missing"):
    store.read(CHUNK)


def test_resync_replace_and_dump(store):
  store.prepare(CHUNK, 0, b"stale pending", 1)
  store.replace(CHUNK, b"from predecessor", version=5, chain_version=3)
  assert store.read(CHUNK) == b"from predecessor" and store.meta(CHUNK) == ChunkMeta(3, 5, 5)
  other = ChunkId(7, 1)
  store.commit(other, store.prepare(other, 0, b"x", 2), 2)
  assert store.dump_meta() == {CHUNK.name: ChunkMeta(3, 5, 5), other.name: ChunkMeta(2, 1, 1)}
  store.remove(other)
  assert other.name not in store.dump_meta() and len(list((store.root / "data").iterdir())) == 1


def test_state_survives_reopening(tmp_path):
  first = ChunkStore(tmp_path / "t", chunk_size=16)
  first.commit(CHUNK, first.prepare(CHUNK, 0, b"durable", 4), 4)
  first.close()
  again = ChunkStore(tmp_path / "t", chunk_size=16)
  assert again.read(CHUNK) == b"durable" and again.meta(CHUNK) == ChunkMeta(4, 1, 1)
  assert not list((tmp_path / "t" / "data").glob("*.tmp"))
  again.close()


def test_a_pending_version_left_by_a_crash_is_dropped_at_open(tmp_path):
  first = ChunkStore(tmp_path / "t", chunk_size=16)
  first.commit(CHUNK, first.prepare(CHUNK, 0, b"committed", 1), 1)
  first.prepare(CHUNK, 0, b"in flight", 1)  # the process dies here
  fresh = ChunkId(9, 9)
  first.prepare(fresh, 0, b"never committed", 1)
  first.close()
  again = ChunkStore(tmp_path / "t", chunk_size=16)
  assert again.read(CHUNK) == b"committed" and again.meta(CHUNK) == ChunkMeta(1, 1, 1)
  assert again.meta(fresh) is None and len(list((tmp_path / "t" / "data").iterdir())) == 1
  again.close()
