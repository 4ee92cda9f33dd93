"""Which chunks a predecessor sends a returning replica (3FS design notes, "Data recovery").

The predecessor compares its chunk metadata with the replica's dump. Versions: `committed` is
the committed chunk version; `update` is the version of an in-flight write (equal to
`committed` when none is pending); `chain_version` is the chain version stored at commit.
"""

from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple


class ChunkMeta(NamedTuple):
  chain_version: int
  committed: int
  update: int  # == committed when no write is pending


class SyncPlan(NamedTuple):
  transfer: frozenset  # chunk ids to send as full-chunk-replace writes
  remove: frozenset  # chunk ids the replica must drop


def plan_sync(local: Mapping[Hashable, ChunkMeta], remote: Mapping[Hashable, ChunkMeta]) -> SyncPlan:
  """The four rules: local-only -> transfer; remote-only -> remove; newer local chain version ->
  transfer; same chain version but local committed != remote update version -> transfer; else
  the replicas are equal or a write in flight will make them so."""
  transfer = set()
  for chunk, mine in local.items():
    theirs = remote.get(chunk)
    if theirs is None or mine.chain_version > theirs.chain_version:
      transfer.add(chunk)
    elif mine.chain_version == theirs.chain_version and mine.committed != theirs.update:
      transfer.add(chunk)
  return SyncPlan(frozenset(transfer), frozenset(set(remote) - set(local)))
