"""Which output partition each row goes to, and the split of one table into those partitions.

Hash keys follow smallpond: DuckDB's `hash(concat_ws('##', cols)) % n`, every column cast to
VARCHAR first. DuckDB's `hash` is deterministic across processes and runs of one DuckDB version,
so a key lands in the same partition in every task; `concat_ws` skips NULLs, so rows that differ
only in where a NULL sits share a partition (that costs balance, never correctness).
"""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pyarrow as pa


def _quote(column: str) -> str:
  return '"' + column.replace('"', '""') + '"'


@dataclasses.dataclass(frozen=True)
class HashSplit:
  """Rows with equal values in `columns` go to the same partition."""

  columns: tuple[str, ...]

  def buckets(self, table: pa.Table, num_partitions: int) -> np.ndarray:
    key = ", ".join(f"CAST({_quote(c)} AS VARCHAR)" for c in self.columns)
    # One thread: a plain projection over one scan keeps the rows in table order.
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
      con.register("t", table.select(list(self.columns)))
      out = con.sql(f"SELECT hash(concat_ws('##', {key})) % {num_partitions} AS b FROM t").to_arrow_table()
    finally:
      con.close()
    return out.column("b").to_numpy().astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ColumnSplit:
  """Rows go to the partition their integer `column` names (smallpond's `data_partition_column`)."""

  column: str

  def buckets(self, table: pa.Table, num_partitions: int) -> np.ndarray:
    values = table.column(self.column)
    if values.null_count:
      raise ValueError(f"partition column {self.column!r} has {values.null_count} nulls")
    if not pa.types.is_integer(values.type):
      raise ValueError(f"partition column {self.column!r} must be integer, got {values.type}")
    buckets = values.to_numpy().astype(np.int64)
    if len(buckets) and (buckets.min() < 0 or buckets.max() >= num_partitions):
      raise ValueError(f"partition column {self.column!r} has values in [{buckets.min()}, {buckets.max()}], "
                       f"outside [0, {num_partitions})")
    return buckets


@dataclasses.dataclass(frozen=True)
class RowRangeSplit:
  """Contiguous row ranges of equal size (within one row) over the whole input: this table's rows
  are rows `offset ...` of `total`."""

  offset: int
  total: int

  def buckets(self, table: pa.Table, num_partitions: int) -> np.ndarray:
    rows = np.arange(self.offset, self.offset + table.num_rows, dtype=np.int64)
    return rows * num_partitions // max(self.total, 1)


@dataclasses.dataclass(frozen=True)
class RandomSplit:
  """Each row to a partition drawn at random (fresh entropy in every task: a different split every run)."""

  def buckets(self, table: pa.Table, num_partitions: int) -> np.ndarray:
    return np.random.default_rng().integers(0, num_partitions, table.num_rows, dtype=np.int64)


Split = HashSplit | ColumnSplit | RowRangeSplit | RandomSplit


def split_table(table: pa.Table, buckets: np.ndarray, num_partitions: int) -> list[pa.Table]:
  """`table`'s rows grouped by bucket, each group in its original row order."""
  if len(buckets) and np.any(buckets[:-1] > buckets[1:]):
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(order), buckets[order]
  bounds = np.searchsorted(buckets, np.arange(num_partitions + 1), side="left")
  return [table.slice(int(bounds[j]), int(bounds[j + 1] - bounds[j])) for j in range(num_partitions)]
