"""storage.dataframe against DuckDB and pyarrow run directly on the same data, on a local data root
and on a local cluster through the `3fs` fsspec filesystem. One process pool per session, per module:
spawned workers are slow to start on 2 cores."""

from __future__ import annotations

import os

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.dataframe import Session, TaskError
from tests.storage.local_cluster import LocalCluster

NUM_ROWS = 3000


def _table(seed: int = 0, num_rows: int = NUM_ROWS) -> pa.Table:
  rng = np.random.default_rng(seed)
  return pa.table({"id": np.arange(num_rows), "key": rng.integers(0, 97, num_rows),
                   "tag": pa.array([f"t{i}" for i in rng.integers(0, 5, num_rows)]),
                   "value": rng.normal(size=num_rows)})


def _sql(query: str, **tables: pa.Table) -> pa.Table:
  con = duckdb.connect()
  for name, table in tables.items():
    con.register(name, table)
  return con.sql(query).to_arrow_table()


def _sorted(table: pa.Table, *columns: str) -> pa.Table:
  return table.sort_by([(c, "ascending") for c in columns])


# Worker-side functions: top-level, so spawned workers unpickle them by reference.
def add_double(table: pa.Table) -> pa.Table:
  return table.append_column("double", pc.multiply(table.column("value"), 2.0))


def positive_value(table: pa.Table):
  return pc.greater(table.column("value"), 0.0)


def fail_on_key_3(table: pa.Table) -> pa.Table:
  if pc.any(pc.equal(table.column("key"), 3)).as_py():
    raise RuntimeError("key 3 is cursed")
  return table


def exit_worker(table: pa.Table) -> pa.Table:
  os._exit(3)


@pytest.fixture(scope="module")
def sess(tmp_path_factory):
  with Session(str(tmp_path_factory.mktemp("jobs")), num_executors=2) as session:
    yield session


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
  """`_table()` as 5 parquet files of 600 rows."""
  root = tmp_path_factory.mktemp("input")
  table = _table()
  for i in range(5):
    pq.write_table(table.slice(i * 600, 600), root / f"part-{i}.parquet")
  return root


def test_read_parquet_globs_dirs_and_columns(sess, input_dir):
  table = _table()
  assert sess.read_parquet(str(input_dir)).to_arrow().equals(table)
  assert sess.read_parquet(f"{input_dir}/part-[34].parquet").to_arrow().equals(table.slice(1800))
  df = sess.read_parquet(str(input_dir), columns=["key", "id"])
  assert df.num_partitions == 1
  assert df.to_arrow().equals(table.select(["key", "id"]))
  assert df.count() == NUM_ROWS
  assert df.take(3) == table.select(["key", "id"]).slice(0, 3).to_pylist()
  with pytest.raises(ValueError, match="missing"):
    sess.read_parquet(str(input_dir), columns=["missing"])
  with pytest.raises(ValueError, match="match no parquet file"):
    sess.read_parquet(f"{input_dir}/*.csv")


def test_hash_repartition_puts_each_key_in_one_partition(sess, input_dir):
  table = _table()
  df = sess.read_parquet(str(input_dir)).repartition(7, hash_by="key")
  parts = df.partition_tables()
  assert len(parts) == 7 and sum(p.num_rows for p in parts) == NUM_ROWS
  # Exactly the documented key: DuckDB's hash(concat_ws('##', CAST(key AS VARCHAR))) % 7.
  expected = _sql("SELECT key, hash(concat_ws('##', CAST(key AS VARCHAR))) % 7 AS p FROM t", t=table)
  where = dict(zip(expected.column("key").to_pylist(), expected.column("p").to_pylist()))
  for j, part in enumerate(parts):
    assert {where[k] for k in part.column("key").to_pylist()} <= {j}
  # Partition order keeps the input's row order within each source partition.
  assert all(pc.all(pc.greater(part.column("id").slice(1), part.column("id").slice(0, part.num_rows - 1))).as_py()
             for part in parts if part.num_rows > 1)
  counts = sess.partial_sql("SELECT key, count(*) AS n, sum(value) AS s FROM {0} GROUP BY key", df).to_arrow()
  direct = _sql("SELECT key, count(*) AS n, sum(value) AS s FROM t GROUP BY key", t=table)
  got, want = _sorted(counts, "key"), _sorted(direct, "key")
  assert got.column("key").equals(want.column("key")) and got.column("n").equals(want.column("n"))
  np.testing.assert_allclose(got.column("s").to_numpy(), want.column("s").to_numpy(), rtol=1e-12)


def test_partial_sql_joins_copartitioned_inputs(sess, input_dir):
  table = _table()
  names = pa.table({"key": np.arange(97), "name": [f"k{i}" for i in range(97)]})
  left = sess.read_parquet(str(input_dir)).repartition(4, hash_by=["key"])
  right = sess.from_arrow(names).repartition(4, hash_by="key")
  joined = sess.partial_sql("SELECT a.id, b.name FROM {0} a JOIN {1} b ON a.key = b.key", left, right).to_arrow()
  direct = _sql("SELECT a.id, b.name FROM a JOIN b ON a.key = b.key", a=table, b=names)
  assert _sorted(joined, "id").equals(_sorted(direct, "id"))
  with pytest.raises(ValueError, match=r"equal partition counts, got \[4, 3\]"):
    sess.partial_sql("SELECT * FROM {0}, {1}", left, right.repartition(3))
  with pytest.raises(ValueError, match=r"names inputs \[2\]"):
    sess.partial_sql("SELECT * FROM {2}", left, right)


def test_even_repartition_by_files_and_by_rows(sess, input_dir):
  table = _table()
  source = sess.read_parquet(str(input_dir))
  by_files = source.repartition(2)
  assert [p.num_rows for p in by_files.partition_tables()] == [1200, 1800]
  more = source.repartition(8)  # fewer files than partitions: empty ones keep the schema
  sizes = sess.partial_sql("SELECT count(*) AS n, sum(value) AS s FROM {0}", more).to_arrow()
  assert sizes.column("n").to_pylist() == [0, 600, 0, 600, 600, 0, 600, 600]
  by_rows = source.repartition(7, by_rows=True)
  parts = by_rows.partition_tables()
  assert max(p.num_rows for p in parts) - min(p.num_rows for p in parts) <= 1
  assert by_rows.to_arrow().equals(table)
  with pytest.raises(ValueError, match="at most one"):
    source.repartition(2, hash_by="key", by_rows=True)
  with pytest.raises(ValueError, match="npartitions"):
    source.repartition(0)


def test_repartition_by_partition_column(sess):
  table = _table().append_column("bucket", pa.array(np.arange(NUM_ROWS) % 3))
  parts = sess.from_arrow(table).repartition(3, by="bucket").partition_tables()
  for j, part in enumerate(parts):
    assert part.equals(table.filter(pc.equal(table.column("bucket"), j)))
  with pytest.raises(TaskError, match=r"repartition#\d+ partition 0 failed: ValueError: .*outside \[0, 2\)"):
    sess.from_arrow(table).repartition(2, by="bucket").count()


def test_map_and_filter_with_sql_and_functions(sess, input_dir):
  table = _table()
  df = sess.read_parquet(str(input_dir)).repartition(3, by_rows=True)
  assert df.map("id, value * 2 AS double").to_arrow().equals(
    _sql("SELECT id, value * 2 AS double FROM t", t=table))
  assert df.map(add_double).to_arrow().equals(add_double(table))
  assert df.filter("value > 0 AND tag = 't1'").to_arrow().equals(
    table.filter(pc.and_(pc.greater(table.column("value"), 0), pc.equal(table.column("tag"), "t1"))))
  chained = df.filter(positive_value).map(add_double).filter("key < 50")
  assert chained.count() == _sql("SELECT count(*) AS n FROM t WHERE value > 0 AND key < 50", t=table)["n"][0].as_py()
  with pytest.raises(ValueError, match="sql_or_func"):
    df.map(3)


def test_write_parquet_and_read_back(sess, input_dir, tmp_path):
  df = sess.read_parquet(str(input_dir)).repartition(3, hash_by="tag")
  df.write_parquet(str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == [f"part-{i:05d}.parquet" for i in range(3)]
  back = sess.read_parquet(str(tmp_path / "out")).to_arrow()
  assert _sorted(back, "id").equals(_table())


def test_task_failures_name_the_task_and_do_not_hang(sess, input_dir):
  df = sess.read_parquet(str(input_dir)).repartition(4, hash_by="key")
  bad = _sql("SELECT hash(concat_ws('##', CAST(3 AS VARCHAR))) % 4 AS p").column("p")[0].as_py()
  with pytest.raises(TaskError, match=rf"write_parquet partition {bad} failed: RuntimeError: key 3 is cursed"):
    df.map(fail_on_key_3).write_parquet(str(sess.job_dir) + "/never")
  # Which partition is named depends on when the pool noticed the death: any of them.
  with pytest.raises(TaskError, match=r"count partition \d failed: a worker process died"):
    df.map(exit_worker).count()
  assert df.count() == NUM_ROWS  # a fresh pool replaces the broken one


def test_memory_root_runs_inline_only():
  with pytest.raises(ValueError, match="per-process memory filesystem"):
    Session("memory://jobs", num_executors=2)
  with Session("memory://jobs", num_executors=0) as inline:
    df = inline.from_items([{"k": i % 4, "v": i} for i in range(40)]).repartition(2, hash_by="k")
    got = inline.partial_sql("SELECT k, sum(v) AS s FROM {0} GROUP BY k", df).to_arrow()
    assert dict(zip(*_sorted(got, "k").to_pydict().values())) == {k: sum(range(k, 40, 4)) for k in range(4)}
    assert inline.from_items([1, 2, 3]).to_arrow().column("item").to_pylist() == [1, 2, 3]


def test_ray_missing_is_a_clear_error(tmp_path):
  try:
    import ray  # noqa: F401
    pytest.skip("Ray is installed here: the error for a missing Ray cannot be shown")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="ray_address='local' needs Ray"):
    Session(str(tmp_path), ray_address="local")
  assert not os.listdir(tmp_path)  # nothing staged by a session that could not start


def test_ray_executor(tmp_path):
  pytest.importorskip("ray", reason="Ray is an optional dependency (pip install 'ray>=2.10'); not installed here")
  with Session(str(tmp_path), ray_address="local") as ray_sess:
    df = ray_sess.from_arrow(_table()).repartition(3, hash_by="key")
    counts = ray_sess.partial_sql("SELECT key, count(*) AS n FROM {0} GROUP BY key", df).to_arrow()
    assert _sorted(counts, "key").equals(_sorted(_sql("SELECT key, count(*) AS n FROM t GROUP BY key", t=_table()),
                                                 "key"))


def test_on_a_local_cluster_through_3fs(tmp_path_factory):
  with LocalCluster(tmp_path_factory.mktemp("cluster"), gc_delay_s=0.0) as cluster:
    fs = fsspec.filesystem("3fs", address=cluster.address)
    table = _table(seed=1, num_rows=1000)
    fs.makedirs("/data", exist_ok=True)
    for i in range(2):
      pq.write_table(table.slice(i * 500, 500), f"/data/in-{i}.parquet", filesystem=fs)
    url = f"3fs://{cluster.address}"
    with Session(f"{url}/jobs", num_executors=2) as remote:
      df = remote.read_parquet(f"{url}/data/*.parquet").repartition(3, hash_by=["key", "tag"])
      assert df.count() == 1000
      shuffled = [p for p in fs.find(f"{remote.job_dir}/staging") if "repartition" in p]
      assert shuffled and all(p.endswith(".parquet") for p in shuffled)  # the shuffle's files are on the cluster
      query = "SELECT key, tag, count(*) AS n, min(id) AS first FROM {0} GROUP BY key, tag"
      remote.partial_sql(query, df).write_parquet(f"{url}/out")
      got = pq.read_table("/out", filesystem=fs)
      want = _sql(query.replace("{0}", "t"), t=table)
      assert _sorted(got, "key", "tag").equals(_sorted(want, "key", "tag"))
      job_dir = remote.job_dir
    assert not fs.exists(job_dir)  # shutdown removed the staging files
    fs.close()


def test_braces_in_sql_and_rewriting_an_output_directory(tmp_path):
  with Session(str(tmp_path / "root"), num_executors=0) as sess:
    df = sess.from_items([{"x": "aa"}, {"x": "a"}])
    got = sess.partial_sql("SELECT '{{0}}' AS lit, regexp_matches(x, '^a{{2}}$') AS two FROM {0} ORDER BY x", df)
    assert got.to_arrow().to_pylist() == [{"lit": "{0}", "two": False}, {"lit": "{0}", "two": True}]
    assert df.filter("regexp_matches(x, '^a{2}$')").to_arrow().column("x").to_pylist() == ["aa"]  # map/filter: literal
    out = str(tmp_path / "out")
    df.repartition(3, by_rows=True).write_parquet(out)
    df.repartition(1).write_parquet(out)              # the earlier write's three parts are gone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.parquet"]
    assert sess.read_parquet(out).count() == 2


def explode_tags(row: dict) -> list[dict]:
  return [{"id": row["id"], "copy": i} for i in range(row["key"] % 3)]


def double_batch(table: pa.Table) -> pa.Table:
  assert table.num_rows <= 7  # the batch size below
  return pa.table({"id": table.column("id"), "double": pc.multiply(table.column("value"), 2)})


def test_flat_map_map_batches_partial_sort_and_random_shuffle(sess, input_dir):
  table = _table()
  df = sess.read_parquet(str(input_dir)).repartition(3, by_rows=True)
  exploded = df.flat_map(explode_tags).to_arrow()
  want = [{"id": i, "copy": c} for i, k in zip(table.column("id").to_pylist(), table.column("key").to_pylist())
          for c in range(k % 3)]
  assert exploded.to_pylist() == want
  assert df.map_batches(double_batch, batch_size=7).to_arrow().equals(
    _sql("SELECT id, value * 2 AS double FROM t", t=table))
  parts = df.partial_sort(["key", "id desc"]).partition_tables()
  assert len(parts) == 3 and sum(p.num_rows for p in parts) == NUM_ROWS
  for part, original in zip(parts, df.partition_tables()):  # each partition sorted, rows kept in their partition
    assert part.equals(_sql('SELECT * FROM t ORDER BY "key", id DESC', t=original))
  # smallpond's random_shuffle is global: rows move between partitions, and each is in random order.
  shuffled, originals = df.random_shuffle().partition_tables(), df.partition_tables()
  assert len(shuffled) == 3 and _sorted(pa.concat_tables(shuffled), "id").equals(_sorted(table, "id"))
  for part, original in zip(shuffled, originals):
    assert set(part.column("id").to_pylist()) != set(original.column("id").to_pylist())
    assert part.column("id").to_pylist() != sorted(part.column("id").to_pylist())
  # A partition with no output rows: its columns come from schema= (without it, a clear error).
  schema = pa.schema([("id", pa.int64()), ("copy", pa.int64())])
  high_keys = df.filter("key >= 50").repartition(3, hash_by="tag")
  assert high_keys.flat_map(explode_tags, schema=schema).partial_sort("id").count() == sum(
    k % 3 for k in table.column("key").to_pylist() if k >= 50)
  assert df.filter("key < 0").flat_map(explode_tags, schema=schema).partial_sort("id").to_arrow().schema == schema
  with pytest.raises(TaskError, match="pass schema="):
    df.filter("key < 0").flat_map(explode_tags).count()
  for bad in (lambda: df.flat_map(3), lambda: df.flat_map(explode_tags, schema="id int"),
              lambda: df.map_batches(double_batch, batch_size=0), lambda: df.partial_sort([]),
              lambda: df.partial_sort(3)):
    with pytest.raises(ValueError):
      bad()
