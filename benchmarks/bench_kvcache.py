"""The KV-cache store: batched lookups from several client processes, against reads of one page each.

  python -m benchmarks.bench_kvcache [--clients=4] [--page_kib=64] [--pages=1024] [--batch=32] [--rounds=200]

Starts `python -m storage cluster` (3 nodes, 3 replicas, every service its own process) in a
temporary directory with a SQLite index beside it, fills a `KVCacheStore` with `--pages` pages
(`put_many` of `--batch`), then, from 1 and from `--clients` processes started together, times
(pages/s and GiB/s over the slowest client's wall time):
  - the baseline: `--baseline_pages` pages drawn at random, read one at a time with seek + read
    on a file opened once (`client.open(path, "rb", buffering=0)`: the stat is fetched at open,
    so each page costs its read RPCs only), what a store without batching would do; slots are
    looked up before the clock starts, so the index is not counted in its favour;
  - the same pages with one `client.pread` each, which also pays a meta `stat` per call (for
    reference; the ratio column `vs_base` is against the seek + read baseline with the same
    number of clients);
  - `batch_exists` and `get_many` of `--batch` consecutive keys (a cached prefix: put together,
    so their slots are adjacent and read as one run), then `get_many` of `--batch` keys drawn
    at random (scattered slots: one read each, still one IoRing submit), `--rounds` calls each.
Every page read is compared in full with what was put, inside each timed loop, on both sides.
All processes share the 2-core host with the cluster, so the figures are the software path's
(RPCs, Python, SQLite), not a disk's or NIC's.
"""

from __future__ import annotations

import multiprocessing
import pathlib
import queue as queue_module
import signal
import sys
import tempfile
import time
import traceback

import numpy as np
from absl import app, flags

from benchmarks.harness import append_results, format_table
from benchmarks.local_cluster import start_cluster

ROOT = "/kvcache-bench"
_BARRIER_TIMEOUT_S = 300  # the longest a reader waits for the others at a phase boundary
_PHASES = ("seek_read", "pread", "exists", "prefix", "scattered")


def _page(index: int, page_bytes: int) -> np.ndarray:
  """Page `index`: its number in every 8 bytes, so a wrong or torn page is caught."""
  return np.full(page_bytes // 8, index, np.int64).view(np.uint8)


def _key(index: int) -> bytes:
  return index.to_bytes(16, "little")


def _check(pages: np.ndarray, expected, what: str) -> None:
  """Raises unless each row of `pages` ([n, page_bytes] uint8) is, in full, the page of its index."""
  if (pages.view(np.int64) != np.asarray(expected, np.int64)[:, None]).any():
    raise RuntimeError(f"{what} returned a wrong page")


def _reader(address: str, kv_path: str, page_bytes: int, pages: int, batch: int, rounds: int,
            baseline_pages: int, seed: int, barrier, queue) -> None:
  """One client process: each phase of `_PHASES`, timed after a barrier; reports to `queue`."""
  try:
    queue.put(("ok", _read_phases(address, kv_path, page_bytes, pages, batch, rounds, baseline_pages, seed,
                                  barrier)))
  except BaseException:  # report, then free the others from the barrier: none waits on a dead reader
    queue.put(("error", f"reader {seed}: {traceback.format_exc()}"))
    barrier.abort()


def _read_phases(address, kv_path, page_bytes, pages, batch, rounds, baseline_pages, seed, barrier) -> dict:
  import storage
  from storage.kv import SqliteKV
  from storage.kvcache import KVCacheStore
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, pages - batch + 1, rounds)
  scattered = [rng.choice(pages, batch, replace=False) for _ in range(rounds)]
  baseline = rng.choice(pages, min(baseline_pages, pages), replace=False)
  kv = SqliteKV(kv_path)
  seconds = {}
  try:
    with storage.connect(address) as client:
      store = KVCacheStore(client, kv, ROOT)  # adopts the geometry the parent created
      where = [store._where(e.slot) for e in store._index.lookup([_key(int(i)) for i in baseline])]
      files = [client.open(path, "rb", buffering=0) for path in store._paths]  # one stat each, here
      out = np.empty((batch, page_bytes), np.uint8)
      one = np.empty((1, page_bytes), np.uint8)

      def seek_read():
        for index, (file, offset) in zip(baseline, where):
          files[file].seek(offset)
          one[0] = np.frombuffer(files[file].read(page_bytes), np.uint8)
          _check(one, [index], "seek + read")

      def pread():
        for index, (file, offset) in zip(baseline, where):
          one[0] = np.frombuffer(client.pread(store._paths[file], offset, page_bytes), np.uint8)
          _check(one, [index], "pread")

      def exists():
        for start in starts:
          if store.batch_exists([_key(int(start) + i) for i in range(batch)]) != batch:
            raise RuntimeError("a filled page is missing from the index")

      def prefix():
        for start in starts:
          found, _ = store.get_many([_key(int(start) + i) for i in range(batch)], out=out)
          if not found.all():
            raise RuntimeError(f"get_many at {start} missed")
          _check(out, np.arange(start, start + batch), f"get_many at {start}")

      def scattered_reads():
        for picked in scattered:
          found, _ = store.get_many([_key(int(i)) for i in picked], out=out)
          if not found.all():
            raise RuntimeError("get_many of scattered keys missed")
          _check(out, picked, "get_many of scattered keys")

      for name, phase in zip(_PHASES, (seek_read, pread, exists, prefix, scattered_reads)):
        barrier.wait()
        begin = time.perf_counter()
        phase()
        seconds[name] = time.perf_counter() - begin
      for f in files:
        f.close()
  finally:
    kv.close()
  return seconds


def _parallel(clients: int, args: tuple, timeout_s: float = 1200) -> dict:
  """Runs `clients` readers together; the slowest one's seconds per phase. Raises RuntimeError
  with the reader's traceback when one fails, and when they are not done within `timeout_s`."""
  ctx = multiprocessing.get_context("spawn")
  queue, barrier = ctx.Queue(), ctx.Barrier(clients, timeout=_BARRIER_TIMEOUT_S)
  procs = [ctx.Process(target=_reader, args=(*args, seed, barrier, queue)) for seed in range(clients)]
  for p in procs:
    p.start()
  results, deadline = [], time.monotonic() + timeout_s
  try:
    while len(results) < clients:
      try:
        kind, value = queue.get(timeout=1.0)
      except queue_module.Empty:
        gone = [p for p in procs if p.exitcode not in (None, 0)]
        if gone:
          raise RuntimeError(f"a reader process died with exit code {gone[0].exitcode} before reporting") from None
        if time.monotonic() > deadline:
          raise RuntimeError(f"the {clients} reader processes did not finish within {timeout_s} s") from None
        continue
      if kind == "error":
        raise RuntimeError(f"a reader process failed:\n{value}")
      results.append(value)
  finally:
    for p in procs:
      p.join(timeout=10 if len(results) == clients else 0.1)
      if p.is_alive():
        p.terminate()
        p.join(timeout=10)
  return {name: max(r[name] for r in results) for name in _PHASES}


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
      read = min(baseline_pages, pages)
      for n in (1, clients):
        seconds = _parallel(n, (address, kv_path, page_bytes, pages, batch, rounds, baseline_pages))
        base = n * read / seconds["seek_read"]
        def row(case, count, phase):
          rate = count / seconds[phase]
          return {"suite": "kvcache", "case": f"{case}, {n} client(s)", "pages_s": round(rate),
                  "gib_s": round(rate * gib, 3), "vs_base": round(rate / base, 2)}
        rows.append(row(f"baseline: seek + read per page, file open ({read} pages each)", n * read, "seek_read"))
        rows.append(row(f"pread per page, a meta stat each ({read} pages each)", n * read, "pread"))
        rows.append({"suite": "kvcache", "case": f"batch_exists of {batch} keys, {n} client(s)",
                     "keys_s": round(n * rounds * batch / seconds["exists"])})
        for label, phase in (("a prefix", "prefix"), ("scattered", "scattered")):
          rows.append(row(f"get_many of {batch} pages ({label})", n * rounds * batch, phase))
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
  flags.DEFINE_integer("baseline_pages", 512, "Pages each reader process reads one at a time for the baselines.")
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
