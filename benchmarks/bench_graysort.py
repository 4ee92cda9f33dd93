"""GraySort over the storage cluster with `storage.dataframe`, against one DuckDB `ORDER BY` in this process.

  python -m benchmarks.bench_graysort [--mb=100] [--inputs=8] [--partitions=8] [--executors=2]

Generates `--mb` MB of 100-byte records (10-byte random key, 90-byte random payload, as gensort
lays them out) and writes them as `--inputs` parquet files to a local 3-node, 3-replica cluster
(`python -m storage cluster`, every service its own process). The timed sort is a Session on the
cluster: read the files (one partition each), tag each record with the top bits of its key,
shuffle into `--partitions` buckets through staging files on the cluster, then sort each bucket
with DuckDB and write it back (smallpond's gray_sort_benchmark, in the same two stages). It checks
that the output is globally ordered (each file sorted, files in key order), has every record,
and has the same order-independent checksum (the sum of xxh64 over the records, mod 2^64) as the
input. The baseline reads the same parquet files from local disk and sorts them with a single
DuckDB `COPY (... ORDER BY key) TO` in this process (DuckDB's own threads, no storage cluster).
Throughput is input MB (10^6 bytes of records) per second of wall time, pool start-up excluded.
"""

from __future__ import annotations

import functools
import pathlib
import signal
import sys
import tempfile
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from absl import app, flags

from benchmarks.harness import append_results, format_table
from benchmarks.local_cluster import start_cluster

KEY_BYTES, RECORD_BYTES = 10, 100


def _records(num_records: int, seed: int) -> np.ndarray:
  """[num_records, 100] uint8: the key in bytes 0-9, the payload after."""
  return np.random.default_rng(seed).integers(0, 256, (num_records, RECORD_BYTES), dtype=np.uint8)


def _to_table(records: np.ndarray) -> pa.Table:
  def column(block: np.ndarray) -> pa.Array:
    width = block.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(block), [None, pa.py_buffer(block.tobytes())])
  return pa.table({"key": column(records[:, :KEY_BYTES]), "payload": column(records[:, KEY_BYTES:])})


def _to_records(table: pa.Table) -> np.ndarray:
  """The inverse of `_to_table`, for DuckDB's BLOB (variable binary) output too."""
  blocks = []
  for name, width in (("key", KEY_BYTES), ("payload", RECORD_BYTES - KEY_BYTES)):
    array = table.column(name).cast(pa.binary(width)).combine_chunks()
    data = np.frombuffer(array.buffers()[1], np.uint8)[array.offset * width:(array.offset + len(array)) * width]
    blocks.append(data.reshape(-1, width))
  return np.concatenate(blocks, axis=1)


def checksum(records: np.ndarray) -> int:
  """Order-independent: the sum of every record's xxh64, mod 2^64."""
  data = memoryview(np.ascontiguousarray(records).tobytes())
  return sum(xxhash.xxh64_intdigest(data[i:i + RECORD_BYTES]) for i in range(0, len(data), RECORD_BYTES)) % (1 << 64)


def is_sorted(records: np.ndarray) -> bool:
  """Whether the keys never decrease (bytewise, as memcmp and DuckDB's BLOB order compare them)."""
  keys = records[:, :KEY_BYTES]
  high = np.ascontiguousarray(keys[:, :8]).view(">u8").ravel()
  low = np.ascontiguousarray(keys[:, 8:]).view(">u2").ravel()
  ok = (high[1:] > high[:-1]) | ((high[1:] == high[:-1]) & (low[1:] >= low[:-1]))
  return bool(ok.all())


def add_bucket(table: pa.Table, bits: int) -> pa.Table:
  """Appends `bucket`: the top `bits` bits of each key (runs in the workers)."""
  key = table.column("key").combine_chunks()
  prefix = np.frombuffer(key.buffers()[1], np.uint8)[key.offset * KEY_BYTES:(key.offset + len(key)) * KEY_BYTES]
  prefix = prefix.reshape(-1, KEY_BYTES)[:, :2].astype(np.int64)
  return table.append_column("bucket", pa.array(((prefix[:, 0] << 8) | prefix[:, 1]) >> (16 - bits)))


def _validate(tables: list[pa.Table], num_records: int, expected_checksum: int, what: str) -> None:
  records = np.concatenate([_to_records(t) for t in tables]) if tables else np.zeros((0, RECORD_BYTES), np.uint8)
  if len(records) != num_records:
    raise RuntimeError(f"{what}: {len(records)} records, expected {num_records}")
  if not is_sorted(records):
    raise RuntimeError(f"{what}: the output is not globally ordered")
  if checksum(records) != expected_checksum:
    raise RuntimeError(f"{what}: the checksum differs from the input's")


def run(data_mb: int = 100, num_inputs: int = 8, num_partitions: int = 8, num_executors: int = 2) -> list[dict]:
  bits = num_partitions.bit_length() - 1
  if num_partitions < 1 or 1 << bits != num_partitions or bits > 16:
    raise ValueError(f"{num_partitions=} must be a power of two <= 65536 (buckets are key-prefix bits)")
  import fsspec

  from storage.dataframe import Session

  num_records = data_mb * 10**6 // RECORD_BYTES
  records = _records(num_records, seed=0)
  expected = checksum(records)
  bounds = [i * num_records // num_inputs for i in range(num_inputs + 1)]
  pieces = [_to_table(records[bounds[i]:bounds[i + 1]]) for i in range(num_inputs)]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    cluster, address = start_cluster(root / "cluster")
    try:
      fs = fsspec.filesystem("3fs", address=address)
      url = f"3fs://{address}"
      fs.makedirs("/graysort/input", exist_ok=True)
      for i, piece in enumerate(pieces):
        pq.write_table(piece, f"/graysort/input/{i:05d}.parquet", filesystem=fs, compression="none")
      with Session(f"{url}/graysort/jobs", num_executors=num_executors) as sess:
        sess.from_items(list(range(num_executors))).repartition(num_executors, by_rows=True).count()  # spawn the pool
        start = time.perf_counter()
        tagged = sess.read_parquet(f"{url}/graysort/input").repartition(num_inputs).map(
          functools.partial(add_bucket, bits=bits))
        buckets = tagged.repartition(num_partitions, by="bucket")
        sess.partial_sql("SELECT key, payload FROM {0} ORDER BY key", buckets).write_parquet(f"{url}/graysort/output")
        sort_s = time.perf_counter() - start
      outputs = sorted(fs.ls("/graysort/output", detail=False))
      _validate([pq.read_table(p, filesystem=fs) for p in outputs], num_records, expected, "storage.dataframe")
      fs.close()
    finally:
      cluster.send_signal(signal.SIGTERM)
      cluster.wait(timeout=30)

    local = root / "local"
    local.mkdir()
    for i, piece in enumerate(pieces):
      pq.write_table(piece, local / f"{i:05d}.parquet", compression="none")
    con = duckdb.connect()
    start = time.perf_counter()
    con.execute(f"COPY (SELECT key, payload FROM read_parquet('{local}/*.parquet') ORDER BY key) "
                f"TO '{root}/duckdb-sorted.parquet' (FORMAT parquet)")
    duckdb_s = time.perf_counter() - start
    con.close()
    _validate([pq.read_table(root / "duckdb-sorted.parquet")], num_records, expected, "duckdb")

  mb = num_records * RECORD_BYTES / 1e6
  rows.append({"suite": "graysort", "case": f"{mb:.0f} MB, {num_inputs} inputs -> {num_partitions} partitions, "
                                            f"{num_executors} executors",
               "seconds": round(sort_s, 2), "mb_s": round(mb / sort_s, 1), "duckdb_seconds": round(duckdb_s, 2),
               "duckdb_mb_s": round(mb / duckdb_s, 1), "vs_duckdb": round(duckdb_s / sort_s, 3), "validated": True})
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this benchmark's flags; only when run as a program, so `python -m benchmarks` can import every suite."""
  flags.DEFINE_integer("mb", 100, "MB (10^6 bytes) of 100-byte records to sort.")
  flags.DEFINE_integer("inputs", 8, "Input parquet files (one partition each).")
  flags.DEFINE_integer("partitions", 8, "Sorted output partitions: a power of two (key-prefix buckets).")
  flags.DEFINE_integer("executors", 2, "Worker processes of the Session.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = run(FLAGS.mb, FLAGS.inputs, FLAGS.partitions, FLAGS.executors)
  append_results("graysort", rows, command=" ".join(["python -m benchmarks.bench_graysort", *sys.argv[1:]]))
  columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "case")))
  print(format_table(rows, ["case", *columns]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
