"""Per-partition recipes: how one task computes one partition's table, starting from parquet files.

A wide step (repartition) writes its output as parquet files under the session's data root. The
narrow steps between two wide steps (map, filter, partial_sql) stay recipes that the next task
evaluates in its own process, so they cost no extra round trip through storage (smallpond's
optimizer fuses such nodes the same way). Recipes are plain picklable values: they travel to
process-pool and Ray workers, and executors exchange data only through the files they name.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Callable, Literal, Union

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

# Intermediate files are read once by the next stage: a cheap codec beats a dense one.
STAGING_COMPRESSION = "snappy"
# `{N}` names input N; `{{` and `}}` are literal braces (as in str.format), e.g. a regex's `a{{2}}`.
_TOKEN = re.compile(r"\{\{|\}\}|\{(\d+)\}")


@dataclasses.dataclass(frozen=True)
class Read:
  """A partition that is a list of parquet files (possibly none: `schema` still types it)."""

  fs: fsspec.AbstractFileSystem
  files: tuple[str, ...]
  schema: pa.Schema
  columns: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Sql:
  """A DuckDB query over the partitions of `inputs`, which it names `{0}`, `{1}`, ..."""

  query: str
  inputs: tuple["Recipe", ...]
  threads: int


@dataclasses.dataclass(frozen=True)
class Apply:
  """A Python function on the whole partition: `map` returns a table, `filter` a boolean mask."""

  input: "Recipe"
  fn: Callable
  kind: Literal["map", "filter"]


Recipe = Union[Read, Sql, Apply]


def placeholders(query: str) -> set[int]:
  """The input indices a `partial_sql` query names as `{0}`, `{1}`, ... (not inside `{{`/`}}` escapes)."""
  return {int(m.group(1)) for m in _TOKEN.finditer(query) if m.group(1) is not None}


def escape_braces(sql: str) -> str:
  """`sql` with its braces doubled, so that it is taken literally inside a query template."""
  return sql.replace("{", "{{").replace("}", "}}")


def substitute(query: str, name) -> str:
  """`query` with each `{N}` replaced by `name(N)` and `{{`/`}}` by single braces."""
  return _TOKEN.sub(lambda m: name(int(m.group(1))) if m.group(1) is not None else m.group(0)[0], query)


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns=None) -> pa.Table:
  """One parquet file through pyarrow; DuckDB then queries the Arrow table (no file handle shared between its threads)."""
  return pq.read_table(path, filesystem=fs, columns=None if columns is None else list(columns))


def write_table(fs: fsspec.AbstractFileSystem, table: pa.Table, path: str) -> None:
  """Writes `path` under a temporary name, then renames it: a failed or retried task never leaves a
  half-written file that a later stage would read as a whole one."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  pq.write_table(table, tmp, filesystem=fs, compression=STAGING_COMPRESSION)
  fs.mv(tmp, path)


def evaluate(recipe: Recipe) -> pa.Table:
  """Computes one partition's table (in whichever process runs the task)."""
  if isinstance(recipe, Read):
    tables = [read_table(recipe.fs, path, recipe.columns) for path in recipe.files]
    if not tables:
      return recipe.schema.empty_table()
    # Python `map` functions may type an empty piece differently (e.g. null columns).
    return pa.concat_tables(tables, promote_options="default")
  if isinstance(recipe, Sql):
    return _run_sql(recipe)
  if isinstance(recipe, Apply):
    table = evaluate(recipe.input)
    if recipe.kind == "filter":
      return table.filter(recipe.fn(table))
    out = recipe.fn(table)
    if isinstance(out, pa.RecordBatch):
      out = pa.Table.from_batches([out])
    if not isinstance(out, pa.Table):
      raise TypeError(f"map function {recipe.fn!r} returned {type(out).__name__}, expected a pyarrow.Table")
    return out
  raise TypeError(f"not a recipe: {recipe!r}")


def _run_sql(recipe: Sql) -> pa.Table:
  # A fresh in-memory database per task (as smallpond does), its threads sized to the executor's share.
  con = duckdb.connect(":memory:", config={"threads": recipe.threads})
  try:
    for i, child in enumerate(recipe.inputs):
      con.register(f"__input{i}", evaluate(child))
    query = substitute(recipe.query, lambda i: f"__input{i}")
    relation = con.sql(query)
    if relation is None:
      raise ValueError(f"partial_sql query returned no rows relation (not a SELECT?): {recipe.query!r}")
    return relation.to_arrow_table()
  finally:
    con.close()
