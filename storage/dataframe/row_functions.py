"""Adapters that turn smallpond's row- and batch-level user functions into partition functions.

`Narrow` applies a function to a whole partition's table; these wrap a user's function (bound
with `functools.partial`, so a worker process can unpickle it when the user's function is
top-level) into one.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pyarrow as pa


def flat_map_rows(fn: Callable[[dict], Iterable[dict]], schema: pa.Schema | None, table: pa.Table) -> pa.Table:
  """Every output row of `fn(row)` for each row (as a dict), in order, with `schema` (None: inferred)."""
  rows = [out for row in table.to_pylist() for out in fn(row)]
  for out in rows[:1]:
    if not isinstance(out, dict):
      raise ValueError(f"flat_map's function must yield dicts (rows), got {type(out).__name__}")
  if not rows and schema is None:
    raise ValueError("flat_map gave a partition no rows, so its columns are unknown: pass schema=")
  return pa.Table.from_pylist(rows, schema=schema)


def map_batches(fn: Callable[[pa.Table], pa.Table], batch_size: int, table: pa.Table) -> pa.Table:
  """`fn` on slices of at most `batch_size` rows, concatenated (an empty partition is one empty slice)."""
  slices = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)] or [table]
  outs = [fn(piece) for piece in slices]
  for out in outs:
    if not isinstance(out, pa.Table):
      raise ValueError(f"map_batches' function must return a pyarrow.Table, got {type(out).__name__}")
  return pa.concat_tables(outs, promote_options="default")
