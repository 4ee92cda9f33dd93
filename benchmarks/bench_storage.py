"""Storage throughput: a local 3-node, 3-replica cluster against local files, in the same process.

  python -m benchmarks.bench_storage [--mib=64] [--clients=4] [--reads=2000]

Starts `python -m storage cluster` (every service its own process) in a temporary directory,
then measures sequential write and read of `--mib` MiB per client from 1 and from `--clients`
processes, against writing and reading the same bytes as local files (written, fsynced, read
back), and random 4 KiB reads through the IoRing (IOPS). Every replica fsyncs each chunk
version, as the local baseline fsyncs its file once, so the write ratio includes replication
(3 copies) and per-chunk durability.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import signal
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks.harness import append_results, format_table
from benchmarks.local_cluster import start_cluster

CHUNK = 1 << 20




def _client_job(address: str, path: str, data_mib: int, queue) -> None:
  import storage
  payload = os.urandom(CHUNK)
  with storage.connect(address) as client:
    start = time.perf_counter()
    with client.open(path, "wb") as f:
      for _ in range(data_mib):
        f.write(payload)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with client.open(path, "rb") as f:
      while f.read(CHUNK):
        pass
    read_s = time.perf_counter() - start
  queue.put((write_s, read_s))


def _local_job(path: str, data_mib: int, queue) -> None:
  payload = os.urandom(CHUNK)
  start = time.perf_counter()
  with open(path, "wb") as f:
    for _ in range(data_mib):
      f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  write_s = time.perf_counter() - start
  start = time.perf_counter()
  with open(path, "rb") as f:
    while f.read(CHUNK):
      pass
  queue.put((write_s, time.perf_counter() - start))


def _parallel(target, argsets) -> tuple[float, float]:
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  procs = [ctx.Process(target=target, args=(*args, queue)) for args in argsets]
  for p in procs:
    p.start()
  results = [queue.get(timeout=600) for _ in procs]
  for p in procs:
    p.join()
  return max(r[0] for r in results), max(r[1] for r in results)  # wall time of the slowest client


def run(data_mib: int = 64, clients: int = 4, reads: int = 2000) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    cluster, address = start_cluster(root / "cluster", chunk_bytes=CHUNK)
    try:
      for n in (1, clients):
        total_mib = data_mib * n
        write_s, read_s = _parallel(_client_job, [(address, f"/bench-{n}-{i}", data_mib) for i in range(n)])
        base_w, base_r = _parallel(_local_job, [(str(root / f"local-{n}-{i}"), data_mib) for i in range(n)])
        for kind, seconds, base in (("write", write_s, base_w), ("read", read_s, base_r)):
          rows.append({"suite": "storage", "case": f"sequential {kind}, {n} client(s) x {data_mib} MiB",
                       "mib_s": round(total_mib / seconds, 1), "local_mib_s": round(total_mib / base, 1),
                       "vs_local": round(base / seconds, 3)})
      import storage
      from storage.ioring import IoRing
      with storage.connect(address) as client:
        size = client.stat("/bench-1-0").size
        rng = np.random.default_rng(0)
        buffer = np.zeros(reads * 4096, np.uint8)
        ring = IoRing(client, buffer, entries=reads)
        for i in range(reads):
          ring.prepare("/bench-1-0", int(rng.integers(0, size // 4096)) * 4096, 4096, i * 4096)
        start = time.perf_counter()
        ring.submit()
        done = ring.wait(timeout=600)
        seconds = time.perf_counter() - start
        assert len(done) == reads and all(c.result == 4096 for c in done)
        local = root / "local-1-0"
        offsets = rng.integers(0, size // 4096, reads) * 4096
        start = time.perf_counter()
        with open(local, "rb") as f:
          for offset in offsets:
            f.seek(int(offset))
            f.read(4096)
        base = time.perf_counter() - start
        rows.append({"suite": "storage", "case": f"random 4 KiB reads via IoRing ({reads})",
                     "iops": round(reads / seconds), "local_iops": round(reads / base),
                     "vs_local": round(base / seconds, 4)})
    finally:
      cluster.send_signal(signal.SIGTERM)
      cluster.wait(timeout=30)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("mib", 64, "MiB written and read per client.")
  flags.DEFINE_integer("clients", 4, "Client processes in the parallel case.")
  flags.DEFINE_integer("reads", 2000, "Random 4 KiB reads through the IoRing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.mib, FLAGS.clients, FLAGS.reads)
  append_results("storage", rows, command=" ".join(["python -m benchmarks.bench_storage", *sys.argv[1:]]))
  columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "case")))
  print(format_table(rows, ["case", *columns]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
