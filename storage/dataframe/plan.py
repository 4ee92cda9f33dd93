"""The lazy plan behind a DataFrame: nodes that turn into per-partition recipes when computed.

Narrow nodes (`Narrow`, `SqlNode`) only wrap their inputs' recipes; `Repartition` is the one wide
node: computing it runs a stage of tasks that write parquet under the session's staging
directory, and it keeps the resulting files, so a DataFrame used twice shuffles once.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Callable, Literal

import pyarrow.parquet as pq

from storage.dataframe import tasks
from storage.dataframe.executors import Task
from storage.dataframe.partitioning import RowRangeSplit, Split
from storage.dataframe.recipes import Apply, Read, Recipe, Sql

if TYPE_CHECKING:
  from storage.dataframe.session import Session


class Node:
  num_partitions: int

  def recipes(self, session: "Session") -> list[Recipe]:
    raise NotImplementedError


class Source(Node):
  """Partitions that already are files (read_parquet, from_arrow)."""

  def __init__(self, leaves: list[Read]):
    self.leaves = leaves
    self.num_partitions = len(leaves)

  def recipes(self, session):
    return list(self.leaves)


class Narrow(Node):
  """A Python function applied to each partition (`map` or `filter`)."""

  def __init__(self, child: Node, fn: Callable, kind: Literal["map", "filter"]):
    self.child, self.fn, self.kind = child, fn, kind
    self.num_partitions = child.num_partitions

  def recipes(self, session):
    return [Apply(r, self.fn, self.kind) for r in self.child.recipes(session)]


class SqlNode(Node):
  """A DuckDB query per partition over inputs with equal partition counts (checked by the caller)."""

  def __init__(self, inputs: list[Node], query: str):
    self.inputs, self.query = inputs, query
    self.num_partitions = inputs[0].num_partitions

  def recipes(self, session):
    per_input = [node.recipes(session) for node in self.inputs]
    return [Sql(self.query, tuple(rs), session.duckdb_threads) for rs in zip(*per_input)]


class Repartition(Node):
  """`num_partitions` new partitions: by `split` (a shuffle), or with `split=None` by dealing
  whole files out in order (smallpond's evenly distributed partitioning, no data rewritten)."""

  def __init__(self, child: Node, num_partitions: int, split: Split | Literal["rows"] | None):
    self.child, self.num_partitions, self.split = child, num_partitions, split
    self._leaves: list[Read] | None = None

  def recipes(self, session):
    if self._leaves is None:
      self._leaves = self._compute(session)
    return list(self._leaves)

  def _compute(self, session) -> list[Read]:
    sources = self.child.recipes(session)
    if self.split is None:
      return _deal_files(materialize_all(session, sources, "files"), self.num_partitions)
    if self.split == "rows":
      sources = materialize_all(session, sources, "rows")
      counts = [_row_count(leaf) for leaf in sources]
      offsets = [sum(counts[:i]) for i in range(len(counts))]
      splits = [RowRangeSplit(offset, sum(counts)) for offset in offsets]
    else:
      splits = [self.split] * len(sources)
    stage, name = session.new_stage("repartition")
    results = session.run([Task(f"{name} partition {i}", tasks.shuffle,
                                (recipe, session.fs, stage, i, self.num_partitions, split))
                           for i, (recipe, split) in enumerate(zip(sources, splits))])
    schema = results[0][1]
    return [Read(session.fs, tuple(paths[j] for paths, _ in results if paths[j] is not None), schema)
            for j in range(self.num_partitions)]


def materialize_all(session: "Session", recipes: list[Recipe], kind: str) -> list[Read]:
  """Writes every partition that is not plain files yet to the staging directory; plain files stay."""
  if all(isinstance(r, Read) for r in recipes):
    return list(recipes)
  stage, name = session.new_stage(kind)
  paths = [posixpath.join(stage, f"{i:05d}.parquet") for i in range(len(recipes))]
  results = session.run([Task(f"{name} partition {i}", tasks.materialize, (recipe, session.fs, path))
                         for i, (recipe, path) in enumerate(zip(recipes, paths))])
  return [Read(session.fs, (path,), schema) for path, (_, schema) in zip(paths, results)]


def _row_count(leaf: Read) -> int:
  return sum(pq.read_metadata(path, filesystem=leaf.fs).num_rows for path in leaf.files)


def _deal_files(leaves: list[Read], num_partitions: int) -> list[Read]:
  """The files of all `leaves` in order, dealt into `num_partitions` contiguous runs (some empty
  when there are fewer files than partitions)."""
  files = [(leaf, path) for leaf in leaves for path in leaf.files]
  first = leaves[0]
  out = []
  for j in range(num_partitions):
    run = files[j * len(files) // num_partitions:(j + 1) * len(files) // num_partitions]
    out.append(Read(first.fs, tuple(path for _, path in run), first.schema, first.columns))
  return out
