"""The target state machine against the design notes' table, exhaustively, and chain updates."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.cluster.resync import ChunkMeta, plan_sync
from storage.cluster.states import Chain, LocalState, PublicState, Target, next_public_state, update_chain

L, P = LocalState, PublicState
ANY, SERVING_PRED, NOT_SERVING_PRED, NO_PRED, HAS_PRED = "any", "serving", "not serving", "none", "some"

# (local, current public, predecessor condition) -> next public: the design notes' table, row by row.
TABLE = [
    (L.UP_TO_DATE, P.SERVING, ANY, P.SERVING), (L.UP_TO_DATE, P.SYNCING, ANY, P.SERVING),
    (L.UP_TO_DATE, P.WAITING, ANY, P.WAITING), (L.UP_TO_DATE, P.LASTSRV, ANY, P.SERVING),
    (L.UP_TO_DATE, P.OFFLINE, ANY, P.WAITING),
    (L.ONLINE, P.SERVING, ANY, P.SERVING),
    (L.ONLINE, P.SYNCING, SERVING_PRED, P.SYNCING), (L.ONLINE, P.SYNCING, NOT_SERVING_PRED, P.WAITING),
    (L.ONLINE, P.WAITING, SERVING_PRED, P.SYNCING), (L.ONLINE, P.WAITING, NOT_SERVING_PRED, P.WAITING),
    (L.ONLINE, P.LASTSRV, ANY, P.SERVING), (L.ONLINE, P.OFFLINE, ANY, P.WAITING),
    (L.OFFLINE, P.SERVING, NO_PRED, P.LASTSRV), (L.OFFLINE, P.SERVING, HAS_PRED, P.OFFLINE),
    (L.OFFLINE, P.SYNCING, ANY, P.OFFLINE), (L.OFFLINE, P.WAITING, ANY, P.OFFLINE),
    (L.OFFLINE, P.LASTSRV, ANY, P.LASTSRV), (L.OFFLINE, P.OFFLINE, ANY, P.OFFLINE),
]


def _matches(condition: str, predecessor: PublicState | None) -> bool:
  return {ANY: True, SERVING_PRED: predecessor is P.SERVING, NOT_SERVING_PRED: predecessor is not P.SERVING,
          NO_PRED: predecessor is None, HAS_PRED: predecessor is not None}[condition]


@pytest.mark.parametrize("local,public,predecessor", list(itertools.product(L, P, [None, *P])))
def test_every_combination_follows_the_table(local, public, predecessor):
  rows = [row for row in TABLE if row[0] is local and row[1] is public and _matches(row[2], predecessor)]
  assert len(rows) == 1, "the table must decide every combination exactly once"
  assert next_public_state(local, public, predecessor) is rows[0][3]


def _chain(*states, version=1):
  return Chain(7, version, tuple(Target(i, p, l) for i, (p, l) in enumerate(states)))


def test_head_failure_moves_it_to_the_end_and_bumps_the_version():
  chain = _chain((P.SERVING, L.UP_TO_DATE), (P.SERVING, L.UP_TO_DATE), (P.SERVING, L.UP_TO_DATE))
  after = update_chain(chain, {0: L.OFFLINE})
  assert [t.target_id for t in after.targets] == [1, 2, 0]
  assert [t.public for t in after.targets] == [P.SERVING, P.SERVING, P.OFFLINE]
  assert after.version == 2 and [t.target_id for t in after.write_path] == [1, 2]
  assert update_chain(after) == after  # a scan with nothing new changes nothing


def test_last_serving_target_becomes_lastsrv_then_serves_again_when_back():
  chain = _chain((P.SERVING, L.UP_TO_DATE), (P.OFFLINE, L.OFFLINE), (P.OFFLINE, L.OFFLINE))
  down = update_chain(chain, {0: L.OFFLINE})
  assert down.targets[0].public is P.LASTSRV and not down.serving
  back = update_chain(down, {0: L.UP_TO_DATE})
  assert back.targets[0].public is P.SERVING


def test_returning_replica_waits_then_syncs_then_serves():
  chain = _chain((P.SERVING, L.UP_TO_DATE), (P.SERVING, L.UP_TO_DATE), (P.OFFLINE, L.OFFLINE))
  steps = [update_chain(chain, {2: L.ONLINE})]
  steps.append(update_chain(steps[-1]))
  steps.append(update_chain(steps[-1], {2: L.UP_TO_DATE}))
  assert [s.targets[2].public for s in steps] == [P.WAITING, P.SYNCING, P.SERVING]
  assert [s.version for s in steps] == [2, 3, 4]
  assert [t.target_id for t in steps[1].write_path] == [0, 1, 2]  # a syncing replica receives writes


@given(st.lists(st.tuples(st.sampled_from(list(P)), st.sampled_from(list(L))), min_size=1, max_size=5),
       st.dictionaries(st.integers(0, 4), st.sampled_from(list(L))))
def test_chain_update_invariants(states, reports):
  chain = _chain(*states)
  after = update_chain(chain, reports)
  assert sorted(t.target_id for t in after.targets) == list(range(len(states)))
  offline = [t.local is L.OFFLINE for t in after.targets]
  assert offline == sorted(offline)  # targets that are down sit at the end
  public = lambda c: [(t.target_id, t.public) for t in c.targets]  # local states alone are not published
  assert (after.version == chain.version + 1) == (public(after) != public(chain))
  assert after.version in (chain.version, chain.version + 1)
  for target in after.targets:  # a target that is down never serves or receives writes
    if target.local is L.OFFLINE:
      assert not target.public.writable


def test_resync_rules():
  local = {"a": ChunkMeta(3, 5, 5), "b": ChunkMeta(3, 5, 5), "c": ChunkMeta(4, 2, 2), "d": ChunkMeta(3, 7, 8),
           "e": ChunkMeta(3, 5, 5)}
  remote = {"b": ChunkMeta(3, 5, 5), "c": ChunkMeta(3, 9, 9), "d": ChunkMeta(3, 7, 7), "e": ChunkMeta(3, 4, 5),
            "z": ChunkMeta(1, 1, 1)}
  plan = plan_sync(local, remote)
  # a: only local; c: newer chain version here; d: committed 7 != remote update 7? equal -> in sync (the pending 8
  # is in flight and will arrive as a normal write); e: remote update 5 == committed 5 -> in flight, skip.
  assert plan.transfer == {"a", "c"} and plan.remove == {"z"}
  assert plan_sync(local, {**remote, "d": ChunkMeta(3, 6, 6)}).transfer == {"a", "c", "d"}


def _settle(chain, scans=6):
  """Scans as mgmtd would, with each syncing replica finishing its resync before the next scan."""
  for _ in range(scans):
    finished = {t.target_id: L.UP_TO_DATE for t in chain.targets if t.public is P.SYNCING}
    chain = update_chain(chain, finished)
  return chain


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_full_outage_recovers_whatever_order_nodes_return_in(order):
  chain = _chain((P.SERVING, L.UP_TO_DATE), (P.SERVING, L.UP_TO_DATE), (P.SERVING, L.UP_TO_DATE))
  down = update_chain(chain, {0: L.OFFLINE, 1: L.OFFLINE, 2: L.OFFLINE})
  assert [t.public for t in down.targets].count(P.LASTSRV) == 1  # exactly one holder of the latest data
  for target in order:
    down = _settle(update_chain(down, {target: L.ONLINE}))
  assert all(t.public is P.SERVING for t in down.targets), down


def test_the_last_server_dying_while_others_sync_leaves_a_lastsrv():
  chain = _chain((P.SERVING, L.UP_TO_DATE), (P.SYNCING, L.ONLINE), (P.WAITING, L.ONLINE))
  after = update_chain(chain, {0: L.OFFLINE})
  assert [t.public for t in after.targets if t.target_id == 0] == [P.LASTSRV]
  back = _settle(update_chain(after, {0: L.ONLINE}))
  assert all(t.public is P.SERVING for t in back.targets)
