"""The lazy DataFrame: each method returns a new one over a bigger plan; `to_arrow`,
`count`, `take` and `write_parquet` compute it on the session's executor."""

from __future__ import annotations

import functools
import posixpath
from typing import TYPE_CHECKING, Any, Callable, Sequence

import fsspec
import pyarrow as pa

from storage.dataframe import row_functions, tasks
from storage.dataframe.executors import Task
from storage.dataframe.partitioning import ColumnSplit, HashSplit, RandomSplit
from storage.dataframe.plan import Narrow, Node, Repartition, SqlNode, materialize_all
from storage.dataframe.recipes import escape_braces, evaluate

if TYPE_CHECKING:
  from storage.dataframe.session import Session


class DataFrame:
  """A distributed table: `num_partitions` partitions, each a parquet-backed recipe. Build one with
  `Session.read_parquet`, `from_arrow`, `from_items` or `partial_sql`."""

  def __init__(self, session: "Session", node: Node):
    self.session, self.node = session, node

  @property
  def num_partitions(self) -> int:
    return self.node.num_partitions

  def __repr__(self) -> str:
    return f"DataFrame({type(self.node).__name__}, num_partitions={self.num_partitions})"

  # Transformations (lazy).

  def repartition(self, npartitions: int, hash_by: str | Sequence[str] | None = None, by: str | None = None,
                  by_rows: bool = False) -> "DataFrame":
    """New partitions, by one of:

    Args:
      npartitions: the number of output partitions.
      hash_by: a column or columns: rows with equal values land in one partition (DuckDB's
        `hash(concat_ws('##', cols)) % npartitions`, see `partitioning`).
      by: an integer column that already holds each row's partition in [0, npartitions).
      by_rows: split the rows evenly (in order, within one row per partition).
      With none of these, whole files are dealt out in order, evenly by count (nothing rewritten).
    """
    if not isinstance(npartitions, int) or npartitions < 1:
      raise ValueError(f"{npartitions=} must be a positive int")
    if sum((hash_by is not None, by is not None, bool(by_rows))) > 1:
      raise ValueError(f"give at most one of {hash_by=}, {by=}, {by_rows=}")
    if hash_by is not None:
      columns = (hash_by,) if isinstance(hash_by, str) else tuple(hash_by)
      if not columns:
        raise ValueError(f"{hash_by=} names no column")
      split = HashSplit(columns)
    elif by is not None:
      split = ColumnSplit(by)
    else:
      split = "rows" if by_rows else None
    return DataFrame(self.session, Repartition(self.node, npartitions, split))

  def map(self, sql_or_func: str | Callable[[pa.Table], pa.Table]) -> "DataFrame":
    """Per partition: a SQL select list (`"a + b AS c, d"`) or a function from the partition's
    pyarrow.Table to a new one (top-level, so workers can unpickle it)."""
    if isinstance(sql_or_func, str):
      return DataFrame(self.session, SqlNode([self.node], f"SELECT {escape_braces(sql_or_func)} FROM {{0}}"))
    if not callable(sql_or_func):
      raise ValueError(f"sql_or_func must be a SQL string or a callable, got {type(sql_or_func).__name__}")
    return DataFrame(self.session, Narrow(self.node, sql_or_func, "map"))

  def filter(self, sql_or_func: str | Callable[[pa.Table], Any]) -> "DataFrame":
    """Keeps the rows where a SQL condition (`"a > 1"`) holds, or where a function of the partition's
    pyarrow.Table returns True (a boolean array with one entry per row)."""
    if isinstance(sql_or_func, str):
      return DataFrame(self.session, SqlNode([self.node], f"SELECT * FROM {{0}} WHERE {escape_braces(sql_or_func)}"))
    if not callable(sql_or_func):
      raise ValueError(f"sql_or_func must be a SQL string or a callable, got {type(sql_or_func).__name__}")
    return DataFrame(self.session, Narrow(self.node, sql_or_func, "filter"))

  def flat_map(self, func: Callable[[dict], Any], schema: pa.Schema | None = None) -> "DataFrame":
    """Per row: `func(row)` (a dict) yields any number of output rows (dicts); a top-level function.

    Args:
      func: row -> iterable of rows.
      schema: the output's columns and types. Without it they are inferred per partition, so a
        partition with no output rows raises (it has no columns to give), and a column whose
        values in one partition are all None may get another type than elsewhere.
    """
    if not callable(func):
      raise ValueError(f"func must be callable, got {type(func).__name__}")
    if schema is not None and not isinstance(schema, pa.Schema):
      raise ValueError(f"schema must be a pyarrow.Schema or None, got {type(schema).__name__}")
    return DataFrame(self.session,
                     Narrow(self.node, functools.partial(row_functions.flat_map_rows, func, schema), "map"))

  def map_batches(self, func: Callable[[pa.Table], pa.Table], batch_size: int = 122880) -> "DataFrame":
    """Per partition, `func` on pyarrow.Table slices of at most `batch_size` rows (smallpond's default
    122880), concatenated; a top-level function."""
    if not callable(func):
      raise ValueError(f"func must be callable, got {type(func).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return DataFrame(self.session,
                     Narrow(self.node, functools.partial(row_functions.map_batches, func, batch_size), "map"))

  def partial_sort(self, by: str | Sequence[str]) -> "DataFrame":
    """Sorts each partition by `by`: column names, each optionally followed by `asc` or `desc`
    (`["b", "a desc"]`); partitions keep their rows."""
    items = (by,) if isinstance(by, str) else tuple(by) if isinstance(by, (list, tuple)) else None
    if not items or not all(isinstance(c, str) and c.strip() for c in items):
      raise ValueError(f"by must name one or more columns, got {by!r}")
    terms = []
    for item in items:
      column, _, direction = item.strip().rpartition(" ")
      if not column or direction.lower() not in ("asc", "desc"):
        column, direction = item.strip(), "asc"
      terms.append('"' + column.strip().replace('"', '""') + '" ' + direction.upper())
    return DataFrame(self.session,
                     SqlNode([self.node], f"SELECT * FROM {{0}} ORDER BY {escape_braces(', '.join(terms))}"))

  def random_shuffle(self) -> "DataFrame":
    """Shuffles every row across the partitions, as smallpond does: each row to a random partition
    (as many as now), then each partition in random order. A different result every run."""
    scattered = Repartition(self.node, self.num_partitions, RandomSplit())
    return DataFrame(self.session, SqlNode([scattered], "SELECT * FROM {0} ORDER BY random()"))

  def partial_sql(self, query: str, *others: "DataFrame") -> "DataFrame":
    """`session.partial_sql(query, self, *others)`."""
    return self.session.partial_sql(query, self, *others)

  # Actions (compute).

  def _recipes(self):
    self.session.check_open()
    return self.node.recipes(self.session)

  def to_arrow(self) -> pa.Table:
    """The whole table: partitions in order, each in its own row order."""
    return pa.concat_tables(self.partition_tables(), promote_options="default")

  def partition_tables(self) -> list[pa.Table]:
    """One table per partition: computed by the executor into staging files, then read here."""
    return [evaluate(leaf) for leaf in materialize_all(self.session, self._recipes(), "collect")]

  def count(self) -> int:
    recipes = self._recipes()
    return sum(self.session.run([Task(f"count partition {i}", tasks.count_rows, (r,))
                                 for i, r in enumerate(recipes)]))

  def take(self, n: int) -> list[dict]:
    """The first `n` rows as dicts, computed partition by partition in this process until there are enough."""
    if n < 0:
      raise ValueError(f"{n=} must be >= 0")
    rows: list[dict] = []
    for recipe in self._recipes():
      if len(rows) >= n:
        break
      rows += evaluate(recipe).slice(0, n - len(rows)).to_pylist()
    return rows

  def write_parquet(self, path: str) -> None:
    """Writes partition i to `path/part-{i:05d}.parquet` (a local directory or any fsspec URL, such as
    `3fs://host:port/dir`), one task per partition; empty partitions give empty files. Part
    files an earlier write left there are removed first (other files are left alone)."""
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    stale = fs.glob(posixpath.join(root, "part-*.parquet"))
    if stale:  # an earlier write's parts: a later reader of the directory would see them too
      fs.rm(stale)
    recipes = self._recipes()
    self.session.run([Task(f"write_parquet partition {i}", tasks.materialize,
                           (r, fs, posixpath.join(root, f"part-{i:05d}.parquet")))
                      for i, r in enumerate(recipes)])

