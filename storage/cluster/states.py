"""Storage-target states and the chain update mgmtd runs on every scan (3FS design notes, "Failure detection").

Each target has a *public* state, shipped with the chain table to every service and client, and
a *local* state, reported in its service's heartbeats (or `offline` when they stop). On each
scan mgmtd orders the chain as live targets (serving ones first, then last-serving, syncing,
waiting) followed by targets whose local state is offline, walks it from head to tail and
applies `next_public_state` with the predecessor's new state; for a target going down, "no
predecessor" means no other target serves or is last-serving. The chain version rises whenever
the order or any public state changed.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Sequence


class PublicState(enum.Enum):
  SERVING = "serving"  # reads and writes
  SYNCING = "syncing"  # writes only: recovery in progress
  WAITING = "waiting"  # alive, recovery not started
  LASTSRV = "lastsrv"  # down, and it was the last serving target
  OFFLINE = "offline"  # down, or its medium failed

  @property
  def readable(self) -> bool:
    return self is PublicState.SERVING

  @property
  def writable(self) -> bool:
    return self in (PublicState.SERVING, PublicState.SYNCING)


class LocalState(enum.Enum):
  UP_TO_DATE = "up-to-date"
  ONLINE = "online"
  OFFLINE = "offline"


def next_public_state(local: LocalState, public: PublicState, predecessor: PublicState | None) -> PublicState:
  """The design notes' transition table; `predecessor` is None for the chain's first target."""
  S = PublicState
  if local is LocalState.UP_TO_DATE:
    return S.WAITING if public in (S.WAITING, S.OFFLINE) else S.SERVING
  if local is LocalState.ONLINE:
    if public in (S.SERVING, S.LASTSRV):
      return S.SERVING
    if public is S.OFFLINE:
      return S.WAITING
    return S.SYNCING if predecessor is S.SERVING else S.WAITING  # syncing or waiting
  if public is S.SERVING:  # local offline
    return S.LASTSRV if predecessor is None else S.OFFLINE
  return S.LASTSRV if public is S.LASTSRV else S.OFFLINE


class Target(NamedTuple):
  target_id: int
  public: PublicState
  local: LocalState


class Chain(NamedTuple):
  chain_id: int
  version: int
  targets: tuple[Target, ...]  # head first

  @property
  def serving(self) -> tuple[Target, ...]:
    return tuple(t for t in self.targets if t.public.readable)

  @property
  def write_path(self) -> tuple[Target, ...]:
    """The targets a write goes through, head to tail: serving ones, then syncing ones."""
    return tuple(t for t in self.targets if t.public.writable)


def update_chain(chain: Chain, local_states: dict[int, LocalState] | None = None) -> Chain:
  """One mgmtd scan of one chain: new local states in, reordered chain with new public states out."""
  targets: Sequence[Target] = chain.targets
  if local_states:
    targets = [t._replace(local=local_states.get(t.target_id, t.local)) for t in targets]
  # Live targets first, those that serve (or served last) ahead of recovering ones, so a returning
  # replica always finds a serving predecessor when one exists; down targets go to the end.
  rank = {PublicState.SERVING: 0, PublicState.LASTSRV: 1, PublicState.SYNCING: 2, PublicState.WAITING: 3,
          PublicState.OFFLINE: 4}
  alive = sorted((t for t in targets if t.local is not LocalState.OFFLINE), key=lambda t: rank[t.public])
  down = [t for t in targets if t.local is LocalState.OFFLINE]
  updated: list[Target] = []
  for target in alive:
    predecessor = updated[-1].public if updated else None
    updated.append(target._replace(public=next_public_state(target.local, target.public, predecessor)))
  for target in down:
    # "has no predecessor" for a target that goes down: no other target serves or is the last
    # server, so this one held the latest data (3FS: lastsrv, "the last serving target").
    holders = [t for t in updated if t.public in (PublicState.SERVING, PublicState.LASTSRV)]
    predecessor = holders[-1].public if holders else None
    updated.append(target._replace(public=next_public_state(target.local, target.public, predecessor)))
  changed = [(t.target_id, t.public) for t in updated] != [(t.target_id, t.public) for t in chain.targets]
  return Chain(chain.chain_id, chain.version + 1 if changed else chain.version, tuple(updated))
