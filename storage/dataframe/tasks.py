"""The task bodies that executors run: top-level functions, so process pools and Ray can pickle them.

Each takes recipes and a place to write, and returns only small values (paths, row counts,
schemas): the data itself moves through storage.
"""

from __future__ import annotations

import posixpath

import fsspec
import pyarrow as pa

from storage.dataframe.partitioning import Split, split_table
from storage.dataframe.recipes import Recipe, evaluate, write_table


def materialize(recipe: Recipe, fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, pa.Schema]:
  """Evaluates one partition and writes it to `path` (even when empty: the file carries the schema).

  Returns:
    (number of rows, schema) of the written table.
  """
  table = evaluate(recipe)
  write_table(fs, table, path)
  return table.num_rows, table.schema


def shuffle(recipe: Recipe, fs: fsspec.AbstractFileSystem, stage_dir: str, source_idx: int, num_partitions: int,
            split: Split) -> tuple[list[str | None], pa.Schema]:
  """Evaluates source partition `source_idx` and writes its rows for each output partition.

  Returns:
    (for each output partition the file written, or None where no row went; the schema).
  """
  table = evaluate(recipe)
  pieces = split_table(table, split.buckets(table, num_partitions), num_partitions)
  paths: list[str | None] = []
  for bucket, piece in enumerate(pieces):
    if piece.num_rows == 0:  # Read carries the schema, so empty pieces need no file
      paths.append(None)
      continue
    path = posixpath.join(stage_dir, f"{bucket:05d}-{source_idx:05d}.parquet")
    write_table(fs, piece, path)
    paths.append(path)
  return paths, table.schema


def count_rows(recipe: Recipe) -> int:
  return evaluate(recipe).num_rows
