"""The KV-cache store: batched lookups from several client processes, against per-page `pread`.

  python -m benchmarks.bench_kvcache [--clients=4] [--page_kib=64] [--pages=1024] [--batch=32] [--rounds=200]

Starts `python -m storage cluster` (3 nodes, 3 replicas, every service its own process) in a
temporary directory with a SQLite index beside it, fills a `KVCacheStore` with `--pages` pages
(`put_many` of `--batch`), then times:
  - `batch_exists` and `get_many` of `--batch` consecutive keys (a cached prefix: put together,
    so their slots are adjacent and read as one run), then `get_many` of `--batch` keys drawn
    at random (scattered slots: one read each, still one IoRing submit), `--rounds` calls each
    from 1 and from `--clients` processes started together (pages/s and GiB/s over the slowest
    client's wall time);
  - the baseline, in this process: the same pages read one `client.pread` each (what a store
    without batching or an index would do; the index lookup is not counted in its favour).
Every page read is checked against what was put. All processes share the 2-core host with the
cluster, so the figures are the software path's (RPCs, Python, SQLite), not a disk's or NIC's.
"""

from __future__ import annotations

import multiprocessing
import pathlib
import signal
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks.harness import append_results, format_table
from benchmarks.local_cluster import start_cluster

ROOT = "/kvcache-bench"




def _page(index: int, page_bytes: int) -> np.ndarray:
  """Page `index`: its number in every 8 bytes, so a wrong page is caught."""
  return np.full(page_bytes // 8, index, np.int64).view(np.uint8)


def _key(index: int) -> bytes:
  return index.to_bytes(16, "little")


def _reader(address: str, kv_path: str, page_bytes: int, pages: int, batch: int, rounds: int, seed: int,
            barrier, queue) -> None:
  """One client process: `rounds` of batch_exists, then `rounds` of get_many, each timed after a barrier."""
  import storage
  from storage.kv import SqliteKV
  from storage.kvcache import KVCacheStore
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, pages - batch + 1, rounds)
  kv = SqliteKV(kv_path)
  with storage.connect(address) as client:
    store = KVCacheStore(client, kv, ROOT)  # adopts the geometry the parent created
    out = np.empty((batch, page_bytes), np.uint8)
    barrier.wait()
    begin = time.perf_counter()
    for start in starts:
      if store.batch_exists([_key(int(start) + i) for i in range(batch)]) != batch:
        raise RuntimeError("a filled page is missing from the index")
    exists_s = time.perf_counter() - begin
    barrier.wait()
    begin = time.perf_counter()
    for start in starts:
      found, _ = store.get_many([_key(int(start) + i) for i in range(batch)], out=out)
      if not found.all() or (out[:, :8].view(np.int64)[:, 0] != np.arange(start, start + batch)).any():
        raise RuntimeError(f"get_many at {start} missed or returned a wrong page")
    get_s = time.perf_counter() - begin
    scattered = [rng.choice(pages, batch, replace=False) for _ in range(rounds)]
    barrier.wait()
    begin = time.perf_counter()
    for picked in scattered:
      found, _ = store.get_many([_key(int(i)) for i in picked], out=out)
      if not found.all() or (out[:, :8].view(np.int64)[:, 0] != picked).any():
        raise RuntimeError("get_many of scattered keys missed or returned a wrong page")
    scattered_s = time.perf_counter() - begin
  kv.close()
  queue.put((exists_s, get_s, scattered_s))


def _parallel(clients: int, args: tuple) -> tuple[float, float, float]:
  ctx = multiprocessing.get_context("spawn")
  queue, barrier = ctx.Queue(), ctx.Barrier(clients)
  procs = [ctx.Process(target=_reader, args=(*args, seed, barrier, queue)) for seed in range(clients)]
  for p in procs:
    p.start()
  results = [queue.get(timeout=600) for _ in procs]
  for p in procs:
    p.join()
  return tuple(max(column) for column in zip(*results))  # the slowest client's wall time, per phase


def run(clients: int = 4, page_kib: int = 64, pages: int = 1024, batch: int = 32, rounds: int = 200,
        baseline_pages: int = 512, chunk_kib: int = 1024) -> list[dict]:
  import storage
  from storage.kv import SqliteKV
  from storage.kvcache import KVCacheStore
  page_bytes = page_kib << 10
  if batch > pages:
    raise ValueError(f"batch={batch} must be at most pages={pages}")
  rows = []
  gib = page_bytes / (1 << 30)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    cluster, address = start_cluster(root / "cluster", chunk_bytes=chunk_kib << 10)
    kv_path = str(root / "index.db")
    kv = SqliteKV(kv_path)
    try:
      with storage.connect(address) as client:
        store = KVCacheStore(client, kv, ROOT, page_bytes=page_bytes, capacity_pages=pages)
        begin = time.perf_counter()
        for start in range(0, pages, batch):
          indices = range(start, min(start + batch, pages))
          stored = store.put_many([_key(i) for i in indices], np.stack([_page(i, page_bytes) for i in indices]))
          if not stored.all():
            raise RuntimeError("the fill did not store every page")
        fill_s = time.perf_counter() - begin
        rows.append({"suite": "kvcache", "case": f"put_many fill, 1 client, {pages} x {page_kib} KiB",
                     "pages_s": round(pages / fill_s), "gib_s": round(pages * gib / fill_s, 3)})
        # Baseline: the same kind of pages, one pread each, as a store without batched I/O reads them.
        slots = [e.slot for e in store._index.lookup([_key(i) for i in range(min(baseline_pages, pages))])]
        begin = time.perf_counter()
        for i, slot in enumerate(slots):
          file, offset = store._where(slot)
          data = client.pread(store._paths[file], offset, page_bytes)
          if np.frombuffer(data[:8], np.int64)[0] != i:
            raise RuntimeError("pread returned a wrong page")
        pread_s = time.perf_counter() - begin
        base = len(slots) / pread_s
        rows.append({"suite": "kvcache", "case": f"baseline: pread per page, 1 client ({len(slots)} pages)",
                     "pages_s": round(base), "gib_s": round(base * gib, 3), "vs_pread": 1.0})
      for n in (1, clients):
        exists_s, get_s, scattered_s = _parallel(n, (address, kv_path, page_bytes, pages, batch, rounds))
        total = n * rounds * batch
        rows.append({"suite": "kvcache", "case": f"batch_exists of {batch} keys, {n} client(s)",
                     "keys_s": round(total / exists_s)})
        for label, seconds in (("a prefix", get_s), ("scattered", scattered_s)):
          rows.append({"suite": "kvcache", "case": f"get_many of {batch} pages ({label}), {n} client(s)",
                       "pages_s": round(total / seconds), "gib_s": round(total * gib / seconds, 3),
                       "vs_pread": round(total / seconds / base, 2)})
    finally:
      kv.close()
      cluster.send_signal(signal.SIGTERM)
      cluster.wait(timeout=30)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("clients", 4, "Reader processes in the parallel case.")
  flags.DEFINE_integer("page_kib", 64, "KiB per page.")
  flags.DEFINE_integer("pages", 1024, "Pages filled (= the store's capacity).")
  flags.DEFINE_integer("batch", 32, "Keys per batch_exists / get_many call.")
  flags.DEFINE_integer("rounds", 200, "Calls per reader process.")
  flags.DEFINE_integer("baseline_pages", 512, "Pages read by single preads for the baseline.")
  flags.DEFINE_integer("chunk_kib", 1024, "The cluster's chunk size in KiB.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.clients, FLAGS.page_kib, FLAGS.pages, FLAGS.batch, FLAGS.rounds, FLAGS.baseline_pages,
             FLAGS.chunk_kib)
  append_results("kvcache", rows, command=" ".join(["python -m benchmarks.bench_kvcache", *sys.argv[1:]]))
  columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "case")))
  print(format_table(rows, ["case", *columns]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
