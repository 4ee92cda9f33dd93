"""The Session: a data root for intermediate files, an executor, and the DataFrame constructors.

  sess = Session(data_root="3fs://127.0.0.1:9000/jobs", num_executors=4)
  df = sess.read_parquet("3fs://127.0.0.1:9000/data/*.parquet").repartition(8, hash_by="user")
  counts = sess.partial_sql("SELECT user, count(*) AS n FROM {0} GROUP BY user", df).to_arrow()
  sess.shutdown()

Intermediate results live under `<data_root>/<job_id>/staging/` (smallpond's staging directory),
reached through fsspec, so workers in other processes or on Ray read what earlier stages wrote.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import tempfile
import uuid
from typing import Any, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from storage.dataframe.dataframe import DataFrame
from storage.dataframe.executors import Task, make_executor
from storage.dataframe.plan import Source, SqlNode
from storage.dataframe.recipes import Read, placeholders, write_table


class Session:
  """Owns the executor and the job's staging directory; use as a context manager or call `shutdown`.

  Args:
    data_root: where intermediate files go: a local directory, an fsspec URL (`3fs://host:port/dir`),
      or `memory://dir` (inline execution only: memory filesystems are per process). None: a new
      local temporary directory.
    num_executors: worker processes; 0 or 1 runs tasks inline in this process. None: one per CPU.
    ray_address: run tasks on Ray at this address ("local" starts one) instead of local processes.
    job_id: the job's directory name under `data_root`; None: a timestamp and a random suffix.
    remove_staging: whether `shutdown` removes the job's directory.
  """

  def __init__(self, data_root: str | None = None, *, num_executors: int | None = None,
               ray_address: str | None = None, job_id: str | None = None, remove_staging: bool = True):
    num_executors = (os.cpu_count() or 1) if num_executors is None else num_executors
    if not isinstance(num_executors, int) or num_executors < 0:
      raise ValueError(f"{num_executors=} must be an int >= 0")
    self._own_root = data_root is None
    data_root = data_root or tempfile.mkdtemp(prefix="dataframe-")
    self.fs, root = fsspec.core.url_to_fs(data_root)
    if "memory" in _protocols(self.fs) and (ray_address is not None or num_executors > 1):
      raise ValueError(f"{data_root=} is a per-process memory filesystem: it needs num_executors <= 1 and no "
                       "ray_address")
    self.executor = make_executor(num_executors, ray_address)  # first: it may fail (no Ray) before files exist
    job_id = job_id or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    self.data_root, self.job_dir = data_root, posixpath.join(root, job_id)
    self.fs.makedirs(posixpath.join(self.job_dir, "staging"), exist_ok=True)
    self.remove_staging = remove_staging
    # Each DuckDB task gets its share of the cores, so parallel tasks do not oversubscribe them.
    self.duckdb_threads = max(1, (os.cpu_count() or 1) // self.executor.num_workers)
    self._num_stages = 0
    self._closed = False

  def __enter__(self) -> "Session":
    return self

  def __exit__(self, *exc) -> None:
    self.shutdown()

  def check_open(self) -> None:
    if self._closed:
      raise RuntimeError("the session is shut down")

  def run(self, tasks: list[Task]) -> list[Any]:
    """Runs tasks on the executor; TaskError names the first that fails."""
    self.check_open()
    return self.executor.run(tasks)

  def new_stage(self, kind: str) -> tuple[str, str]:
    """A fresh staging directory for one stage's files, and the stage's name for task names."""
    self._num_stages += 1
    name = f"{kind}#{self._num_stages}"
    path = posixpath.join(self.job_dir, "staging", f"{self._num_stages:04d}-{kind}")
    self.fs.makedirs(path, exist_ok=True)
    return path, name

  def shutdown(self) -> None:
    """Stops the executor and (with `remove_staging`) removes the job's directory."""
    if self._closed:
      return
    self._closed = True
    self.executor.shutdown()
    if self.remove_staging:
      self.fs.rm(self.job_dir if not self._own_root else posixpath.dirname(self.job_dir), recursive=True)

  # DataFrame constructors.

  def read_parquet(self, paths: str | Sequence[str], columns: Sequence[str] | None = None,
                   recursive: bool = False) -> DataFrame:
    """One partition over parquet files (repartition to spread it).

    Args:
      paths: files, directories (their `*.parquet` files) or globs, as local paths or fsspec URLs,
        all on one filesystem. Every file must have the same schema.
      columns: the columns to read; None reads all.
      recursive: whether directories include the parquet files of their subdirectories.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
      raise ValueError(f"{paths=} names no file")
    fs, files = None, []
    for path in paths:
      path_fs, stripped = fsspec.core.url_to_fs(path)
      if fs is not None and path_fs is not fs:
        raise ValueError(f"paths={paths} span several filesystems; read them separately")
      fs = path_fs
      files += _expand(fs, stripped, recursive)
    if not files:
      raise ValueError(f"paths={paths} match no parquet file")
    schema = pq.read_schema(files[0], filesystem=fs)
    if columns is not None:
      missing = [c for c in columns if c not in schema.names]
      if missing:
        raise ValueError(f"columns={list(columns)} not in the files' schema ({schema.names}): {missing}")
      schema = pa.schema([schema.field(c) for c in columns])
      columns = tuple(columns)
    return DataFrame(self, Source([Read(fs, tuple(files), schema, columns)]))

  def from_arrow(self, table: pa.Table) -> DataFrame:
    """One partition holding `table` (written to staging now, so workers can read it)."""
    if not isinstance(table, pa.Table):
      raise ValueError(f"table must be a pyarrow.Table, got {type(table).__name__}")
    stage, _ = self.new_stage("from_arrow")
    path = posixpath.join(stage, "00000.parquet")
    write_table(self.fs, table, path)
    return DataFrame(self, Source([Read(self.fs, (path,), table.schema)]))

  def from_items(self, items: Sequence[Any]) -> DataFrame:
    """One partition from a list of dicts (or of plain values, as column `item`)."""
    items = list(items)
    if items and not isinstance(items[0], dict):
      items = [{"item": value} for value in items]
    return self.from_arrow(pa.Table.from_pylist(items))

  def partial_sql(self, query: str, *inputs: DataFrame) -> DataFrame:
    """A DuckDB query run on each partition: `{0}`, `{1}`, ... name the inputs' partitions.

    Braces the query means literally are doubled, as in str.format: `'a{{2}}'` is the regex `a{2}`.

    Raises:
      ValueError: no input, inputs with different partition counts or of another session, or a
        placeholder with no input.
    """
    if not inputs:
      raise ValueError("partial_sql needs at least one input DataFrame")
    if any(df.session is not self for df in inputs):
      raise ValueError("inputs belong to another Session")
    counts = [df.num_partitions for df in inputs]
    if len(set(counts)) > 1:
      raise ValueError(f"partial_sql inputs must have equal partition counts, got {counts}")
    unknown = sorted(i for i in placeholders(query) if i >= len(inputs))
    if unknown:
      raise ValueError(f"{query=} names inputs {unknown}, but only {len(inputs)} are given")
    return DataFrame(self, SqlNode([df.node for df in inputs], query))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
  return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _expand(fs: fsspec.AbstractFileSystem, path: str, recursive: bool) -> list[str]:
  if any(ch in path for ch in "*?["):
    return sorted(p for p in fs.glob(path) if fs.isfile(p))
  if fs.isdir(path):
    found = fs.find(path) if recursive else fs.ls(path, detail=False)
    return sorted(p for p in found if p.endswith(".parquet") and fs.isfile(p))
  if not fs.exists(path):
    raise FileNotFoundError(f"no such file or directory: {path}")
  return [path]
